//! AVX2 + FMA + F16C path: 8 lanes, scalar tails at the edges of each reduction block.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::portable::{block_k, weight, RowScales};
use crate::{Cols, Weights};

/// How one weight format is widened to 8 f32 lanes.
trait Fmt {
    type E;
    unsafe fn load(p: *const Self::E) -> __m256;
    /// 16 weights as two vectors (FP8 widens them together: fewer instructions per weight).
    #[inline(always)]
    unsafe fn load2(p: *const Self::E) -> (__m256, __m256) {
        (Self::load(p), Self::load(p.add(8)))
    }
}

struct F32;
struct Bf16;
struct Fp8;

impl Fmt for F32 {
    type E = f32;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl Fmt for Bf16 {
    type E = u16;
    #[inline(always)]
    unsafe fn load(p: *const u16) -> __m256 {
        let v = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }
}

impl Fmt for Fp8 {
    type E = u8;
    /// e4m3 → the f16 bits of e4m3 / 2⁸ (see [`crate::fp8`]) → f32.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256 {
        let h = _mm_slli_epi16::<7>(_mm_cvtepi8_epi16(_mm_loadl_epi64(p as *const __m128i)));
        _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(0xBFFFu16 as i16)))
    }
    #[inline(always)]
    unsafe fn load2(p: *const u8) -> (__m256, __m256) {
        let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)));
        let h = _mm256_and_si256(h, _mm256_set1_epi16(0xBFFFu16 as i16));
        (_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// R weight rows × C input rows over the whole K, block by block of the reduction.
#[inline(always)]
unsafe fn tile<F: Fmt, const R: usize, const C: usize>(c: &Cols, w: *const F::E, n: usize, m: usize) {
    let p = c.p;
    let k = p.k;
    let bk = block_k(p);
    let x = p.x.as_ptr().add(m * k);
    let wrow = w.add(n * k);
    let rs: [RowScales; R] = std::array::from_fn(|r| RowScales::new(p, n + r));
    let mut total = [[0f32; C]; R];
    let mut k0 = 0;
    let mut kb = 0;
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut kk = k0;
        while kk + 8 <= k1 {
            let mut xv = [_mm256_setzero_ps(); C];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(j * k + kk));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // The next tile's rows load while these are multiplied (few input rows per weight
                // row leave the tiles waiting on four cold streams otherwise).
                _mm_prefetch::<_MM_HINT_T0>(wrow.wrapping_add(R * k + r * k + kk) as *const i8);
                let wv = F::load(wrow.add(r * k + kk));
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, xv[j], *a);
                }
            }
            kk += 8;
        }
        for (r, (trow, arow)) in total.iter_mut().zip(&acc).enumerate() {
            let f = rs[r].at(kb);
            for (j, (t, a)) in trow.iter_mut().zip(arow).enumerate() {
                let mut s = hsum(*a);
                for q in kk..k1 {
                    s += *x.add(j * k + q) * weight(&p.w, (n + r) * k + q);
                }
                *t += match f {
                    Some(f) => s * f,
                    None => s,
                };
            }
        }
        k0 = k1;
        kb += 1;
    }
    for (r, row) in total.iter().enumerate() {
        for (j, t) in row.iter().enumerate() {
            *c.out.add((m + j) * p.n + n + r) = *t;
        }
    }
}

/// How far ahead (bytes) a streamed weight row is prefetched (as on the AVX-512 path).
const PF: usize = 4096;
/// How far ahead the row also prefetches into L2 only: more of the stream in flight than L1's
/// miss buffers hold. On Zen 3 (one-process A/B, 600 batch-1 steps): 1.04-1.05× with it at
/// 16 KiB, 1.03-1.04× at 32, 1.02-1.03× at 8; instead of the L1 prefetch 1.02-1.03×; FP8 even
/// (1.00). The same far prefetch in the tiles (batched decode) was 14% slower.
const PF_FAR: usize = 16384;

/// One weight row against one input row, four accumulators deep with the row prefetched ahead:
/// decode's product, one long sequential read per task (the 4-row tile keeps four FMA chains
/// one deep and reads at ~13 GB/s for FP8 on Zen 4; this reads at memory speed).
#[inline(always)]
unsafe fn row<F: Fmt>(c: &Cols, w: *const F::E, n: usize, m: usize) {
    let p = c.p;
    let k = p.k;
    let bk = block_k(p);
    let x = p.x.as_ptr().add(m * k);
    let w = w.add(n * k);
    let rs = RowScales::new(p, n);
    let mut total = 0f32;
    let (mut k0, mut kb) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut kk = k0;
        while kk + 32 <= k1 {
            _mm_prefetch::<_MM_HINT_T0>((w.add(kk) as *const i8).add(PF));
            _mm_prefetch::<_MM_HINT_T1>((w.add(kk) as *const i8).add(PF_FAR));
            for u in [0, 2] {
                let o = kk + 8 * u;
                let (w0, w1) = F::load2(w.add(o));
                acc[u] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(o)), acc[u]);
                acc[u + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(o + 8)), acc[u + 1]);
            }
            kk += 32;
        }
        while kk + 8 <= k1 {
            acc[0] = _mm256_fmadd_ps(F::load(w.add(kk)), _mm256_loadu_ps(x.add(kk)), acc[0]);
            kk += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for q in kk..k1 {
            s += *x.add(q) * weight(&p.w, n * k + q);
        }
        total += match rs.at(kb) {
            Some(f) => s * f,
            None => s,
        };
        k0 = k1;
        kb += 1;
    }
    *c.out.add(m * p.n + n) = total;
}

four_by_three_sweep!();

/// # Safety
/// The CPU has AVX2, FMA and F16C; `c.out` points to `m * n` writable floats and no other thread
/// writes columns `n0..n1`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn columns(c: &Cols, m0: usize, m1: usize) {
    match c.p.w {
        Weights::F32(w) => sweep::<F32>(c, w.as_ptr(), m0, m1),
        Weights::Bf16(w) => sweep::<Bf16>(c, w.as_ptr(), m0, m1),
        Weights::Fp8(f) => sweep::<Fp8>(c, f.q.as_ptr(), m0, m1),
    }
}
