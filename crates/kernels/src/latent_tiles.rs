//! Register tiles of the decode attention over the latent cache (`attention::latent_attention`):
//! scores of several queries against several cache rows, and the probability-weighted sum of
//! cache rows for several queries, each cache vector loaded once for the whole tile.
//!
//! Why tiles: a (query, key) pair at a time (a dot product, then an `axpy` into the output row)
//! loads two vectors per multiply-add and stores the output row once per key; at 2048 tokens of
//! context that was ~150 cycles per (key, head) pair. A 4 × 4 score tile loads half a vector per
//! multiply-add, and the value tile keeps its outputs in registers across all keys of a block.
//! One generic source over [`Lanes`] serves AVX-512 (16 lanes), AVX2 (8) and the portable path (1).

/// A vector of `N` f32 lanes.
pub(crate) trait Lanes {
    type V: Copy;
    const N: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn sum(v: Self::V) -> f32;
}

/// An element of a cache row: f32 or bf16 bits.
pub(crate) trait Row: Copy {
    unsafe fn vec<L: Lanes>(p: *const Self) -> L::V;
    fn get(self) -> f32;
}

impl Row for f32 {
    #[inline(always)]
    unsafe fn vec<L: Lanes>(p: *const f32) -> L::V {
        L::load(p)
    }
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}

impl Row for u16 {
    #[inline(always)]
    unsafe fn vec<L: Lanes>(p: *const u16) -> L::V {
        L::load_bf16(p)
    }
    #[inline(always)]
    fn get(self) -> f32 {
        crate::bf16_to_f32(self)
    }
}

pub(crate) struct Scalar;

impl Lanes for Scalar {
    type V = f32;
    const N: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> f32 {
        crate::bf16_to_f32(*p)
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn sum(v: f32) -> f32 {
        v
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512 {
    type V = std::arch::x86_64::__m512;
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        std::arch::x86_64::_mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self::V {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
            16,
        ))
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        std::arch::x86_64::_mm512_reduce_add_ps(v)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2 {
    type V = std::arch::x86_64::__m256;
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self::V {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        ))
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        use std::arch::x86_64::*;
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
    }
}

/// `out[a][b] = Σ_{i<w} q[a][i] · c[b][i]` for `QA` query rows and `KB` cache rows.
///
/// # Safety
/// Every pointer reads `w` values; the CPU has `L`'s instruction set.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices over the tile's register arrays read clearest
pub(crate) unsafe fn dot_tile<L: Lanes, E: Row, const QA: usize, const KB: usize>(
    q: [*const f32; QA],
    c: [*const E; KB],
    w: usize,
) -> [[f32; KB]; QA] {
    let mut acc = [[L::zero(); KB]; QA];
    let mut i = 0;
    while i + L::N <= w {
        let cv: [L::V; KB] = std::array::from_fn(|b| E::vec::<L>(c[b].add(i)));
        for a in 0..QA {
            let qv = L::load(q[a].add(i));
            for b in 0..KB {
                acc[a][b] = L::fma(qv, cv[b], acc[a][b]);
            }
        }
        i += L::N;
    }
    let mut out = [[0f32; KB]; QA];
    for a in 0..QA {
        for b in 0..KB {
            let mut s = L::sum(acc[a][b]);
            for j in i..w {
                s += *q[a].add(j) * (*c[b].add(j)).get();
            }
            out[a][b] = s;
        }
    }
    out
}

/// `o[a][col + u·N + l] = Σ_t e[a][t] · c[t][col + u·N + l]` for `QA` rows of probabilities `e`
/// (one per key of `c`), `CW` vectors of columns from `col`.
///
/// # Safety
/// `e[a]` reads `c.len()` values, every row of `c` and `o[a]` covers `col + CW·N` columns; the CPU
/// has `L`'s instruction set.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices over the tile's register arrays read clearest
pub(crate) unsafe fn weighted_rows_tile<L: Lanes, E: Row, const QA: usize, const CW: usize>(
    e: [*const f32; QA],
    c: &[*const E],
    col: usize,
    o: [*mut f32; QA],
) {
    let mut acc = [[L::zero(); CW]; QA];
    for (t, &row) in c.iter().enumerate() {
        let cv: [L::V; CW] = std::array::from_fn(|u| E::vec::<L>(row.add(col + u * L::N)));
        for a in 0..QA {
            let ev = L::splat(*e[a].add(t));
            for u in 0..CW {
                acc[a][u] = L::fma(ev, cv[u], acc[a][u]);
            }
        }
    }
    for a in 0..QA {
        for u in 0..CW {
            L::store(o[a].add(col + u * L::N), acc[a][u]);
        }
    }
}
