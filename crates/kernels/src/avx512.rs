//! AVX-512 paths: 16 lanes, masked loads for the edges of K (no scalar tails), and with
//! AVX512_BF16 `vdpbf16ps` for bf16 weights against bf16 activations (32 products per
//! instruction, no widening).
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::portable::{block_k, RowScales};
use crate::{fp8, Cols, Weights};

/// How many bytes of the next group of weight rows a tile prefetches at once ([`lead_in`]).
/// Software prefetch is for the tiles only; [`row`] says why the one-row kernels have none.
///
/// The bf16 and FP8 tiles' prefetches are non-temporal (`NTA`): a weight is read once a step, and
/// keeping it out of L2 leaves the code and data of the single-threaded work between products
/// cached. (The AVX2 path keeps `T0`: there `NTA` measured 0-5% slower.)
const PF: usize = 4096;

/// How one weight format is widened to 16 f32 lanes.
trait Fmt {
    type E;
    const SCALED: bool;
    unsafe fn load(p: *const Self::E) -> __m512;
    unsafe fn load_masked(p: *const Self::E, mask: __mmask16) -> __m512;
}

struct F32;
struct Bf16;
struct Fp8;

impl Fmt for F32 {
    type E = f32;
    const SCALED: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

impl Fmt for Bf16 {
    type E = u16;
    const SCALED: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u16) -> __m512 {
        let v = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const u16, mask: __mmask16) -> __m512 {
        let v = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
}

/// e4m3 → the f16 bits of e4m3 / 2⁸ (see [`crate::fp8`]) → f32.
#[inline(always)]
unsafe fn fp8_widen(v: __m128i) -> __m512 {
    let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(v));
    _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(0xBFFFu16 as i16)))
}

impl Fmt for Fp8 {
    type E = u8;
    const SCALED: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512 {
        fp8_widen(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const u8, mask: __mmask16) -> __m512 {
        fp8_widen(_mm_maskz_loadu_epi8(mask, p as *const i8))
    }
}

/// R weight rows × C input rows over the whole K; blocks of the reduction scaled for FP8.
#[inline(always)]
unsafe fn tile<F: Fmt, const R: usize, const C: usize>(c: &Cols, w: *const F::E, n: usize, m: usize) {
    let p = c.p;
    let k = p.k;
    let bk = if F::SCALED { block_k(p) } else { k };
    let x = p.x.as_ptr().add(m * k);
    let w = w.add(n * k);
    let rs: [RowScales; R] = std::array::from_fn(|r| RowScales::new(p, n + r));
    let mut total = [[_mm512_setzero_ps(); C]; R];
    let mut k0 = 0;
    let mut kb = 0;
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = k0;
        while kk + 16 <= k1 {
            let mut xv = [_mm512_setzero_ps(); C];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(x.add(j * k + kk));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // The next tile's rows, as in `tile_dp_scaled`.
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(R * k + r * k + kk) as *const i8);
                let wv = F::load(w.add(r * k + kk));
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(wv, xv[j], *a);
                }
            }
            kk += 16;
        }
        if kk < k1 {
            let mask = ((1u32 << (k1 - kk)) - 1) as __mmask16;
            let mut xv = [_mm512_setzero_ps(); C];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, x.add(j * k + kk));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = F::load_masked(w.add(r * k + kk), mask);
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(wv, xv[j], *a);
                }
            }
        }
        fold_block(&mut total, &acc, &rs, kb, F::SCALED);
        k0 = k1;
        kb += 1;
    }
    store_tile(c, &total, n, m);
}

/// Adds one reduction block's partial sums into a tile's totals, scaled by each row's block scale
/// (FP8); unscaled weights have a single block, whose sums are the totals.
#[inline(always)]
unsafe fn fold_block<const R: usize, const C: usize>(
    total: &mut [[__m512; C]; R],
    acc: &[[__m512; C]; R],
    rs: &[RowScales; R],
    kb: usize,
    scaled: bool,
) {
    if !scaled {
        *total = *acc;
        return;
    }
    for (r, (trow, arow)) in total.iter_mut().zip(acc).enumerate() {
        let s = _mm512_set1_ps(rs[r].at(kb).unwrap_or(1.0));
        for (t, a) in trow.iter_mut().zip(arow) {
            *t = _mm512_fmadd_ps(*a, s, *t);
        }
    }
}

/// Writes a tile's totals (weight rows `n..n + R` × input rows `m..m + C`), each summed across
/// its lanes.
#[inline(always)]
unsafe fn store_tile<const R: usize, const C: usize>(c: &Cols, total: &[[__m512; C]; R], n: usize, m: usize) {
    for (r, row) in total.iter().enumerate() {
        for (j, t) in row.iter().enumerate() {
            *c.out.add((m + j) * c.p.n + n + r) = _mm512_reduce_add_ps(*t);
        }
    }
}

/// Prefetches the first [`PF`] bytes of the weight rows a tile reads next, while the current ones
/// are multiplied.
#[inline(always)]
unsafe fn lead_in<T>(w: *const T, len: usize) {
    let p = w as *const i8;
    let bytes = (len * std::mem::size_of::<T>()).min(PF);
    for o in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_NTA>(p.add(o));
    }
}

/// One weight row against one input row, four accumulators deep (decode: one long sequential read
/// per task).
///
/// No software prefetch here, nor in the other one-row kernels ([`sweep_dp_row`], [`row_lut`]): a
/// front-to-back read is what the hardware prefetchers follow on their own. On a second Zen 4 VM,
/// dropping a prefetch 4 KiB ahead made a batch-1 decode step 1.19-1.27x faster in bf16
/// (`vdpbf16ps` row), 1.30-1.38x on this f32-widening row and 1.03-1.06x in FP8, measured in one
/// process alternating every 5 steps, while batch-16 steps (the tiles, 4 weight rows interleaved)
/// were 18-21% longer without theirs. (The first Zen 4 VM had measured `NTA` 4-6% better than
/// `T0` there; neither against none.) llama.cpp's rows do not prefetch either.
#[inline(always)]
unsafe fn row<F: Fmt>(c: &Cols, w: *const F::E, n: usize, m: usize) {
    let p = c.p;
    let k = p.k;
    let bk = if F::SCALED { block_k(p) } else { k };
    let x = p.x.as_ptr().add(m * k);
    let w = w.add(n * k);
    let rs = RowScales::new(p, n);
    let mut total = _mm512_setzero_ps();
    let (mut k0, mut kb) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut kk = k0;
        while kk + 64 <= k1 {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = kk + 16 * u;
                *a = _mm512_fmadd_ps(F::load(w.add(o)), _mm512_loadu_ps(x.add(o)), *a);
            }
            kk += 64;
        }
        while kk < k1 {
            let left = k1 - kk;
            let mask = if left >= 16 { 0xFFFF } else { ((1u32 << left) - 1) as __mmask16 };
            acc[0] = _mm512_fmadd_ps(
                F::load_masked(w.add(kk), mask),
                _mm512_maskz_loadu_ps(mask, x.add(kk)),
                acc[0],
            );
            kk += 16;
        }
        let a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        total =
            if F::SCALED { _mm512_fmadd_ps(a, _mm512_set1_ps(rs.at(kb).unwrap_or(1.0)), total) } else { a };
        k0 = k1;
        kb += 1;
    }
    *c.out.add(m * p.n + n) = _mm512_reduce_add_ps(total);
}

// One weight row at a time: two at once, as on the AVX2 path (`avx2::stream_pairs`), measured
// neutral on Zen 5 (one-process A/B over 600 batch-1 steps: 1.007 and 1.016, here and in
// `sweep_dp_row` and `row_lut`), so the simpler loop stays.
four_by_three_sweep!();

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
unsafe fn sweep_dp(c: &Cols, xb: *const u16, w: *const u16, m0: usize, m1: usize) {
    let mut n = c.n0;
    while n < c.n1 {
        let r = if c.n1 - n >= 4 { 4 } else { 1 };
        let mut m = m0;
        while m < m1 {
            let cols = (m1 - m).min(4);
            match (r, cols) {
                (4, 4) => tile_dp_scaled::<false, 4, 4>(c, xb, w, n, m),
                (4, 3) => tile_dp_scaled::<false, 4, 3>(c, xb, w, n, m),
                (4, 2) => tile_dp_scaled::<false, 4, 2>(c, xb, w, n, m),
                (4, _) => tile_dp_scaled::<false, 4, 1>(c, xb, w, n, m),
                (_, 4) => tile_dp_scaled::<false, 1, 4>(c, xb, w, n, m),
                (_, 3) => tile_dp_scaled::<false, 1, 3>(c, xb, w, n, m),
                (_, 2) => tile_dp_scaled::<false, 1, 2>(c, xb, w, n, m),
                _ => tile_dp_scaled::<false, 1, 1>(c, xb, w, n, m),
            }
            m += cols;
        }
        n += r;
    }
}

/// One FP8 weight row widened to bf16 bits in memory order ([`fp8_lut_bf16`], then its two
/// vectors' 128-bit lanes interleaved back): exact, ~10 instructions per 64 weights.
#[inline(always)]
unsafe fn widen_row_bf16(q: *const u8, k: usize, out: *mut u16, t: &Lut) {
    let lo_idx = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    let hi_idx = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    let mut kk = 0;
    while kk < k {
        let left = k - kk;
        let b = if left >= 64 {
            _mm512_loadu_si512(q.add(kk) as *const _)
        } else {
            _mm512_maskz_loadu_epi8((1u64 << left) - 1, q.add(kk) as *const i8)
        };
        let (w0, w1) = fp8_lut_bf16(b, t);
        let first = _mm512_permutex2var_epi64(w0, lo_idx, w1);
        let second = _mm512_permutex2var_epi64(w0, hi_idx, w1);
        let dst = out.add(kk);
        if left >= 64 {
            _mm512_storeu_si512(dst as *mut _, first);
            _mm512_storeu_si512(dst.add(32) as *mut _, second);
        } else {
            let m = |o: usize| {
                if left >= o + 32 {
                    u32::MAX
                } else if left > o {
                    (1u32 << (left - o)) - 1
                } else {
                    0
                }
            };
            _mm512_mask_storeu_epi16(dst as *mut i16, m(0), first);
            _mm512_mask_storeu_epi16(dst.add(32) as *mut i16, m(32), second);
        }
        kk += 64;
    }
}

/// R bf16 weight rows × C bf16 input rows with `vdpbf16ps` (32 products per instruction). Plain:
/// `w` is the whole weight matrix (rows from `n`). `SCALED` (widened FP8): `w` holds just these R
/// rows, and the reduction runs block by block with each block's partial sums scaled by its FP8
/// block scale.
#[inline(always)]
unsafe fn tile_dp_scaled<const SCALED: bool, const R: usize, const C: usize>(
    c: &Cols,
    xb: *const u16,
    w: *const u16,
    n: usize,
    m: usize,
) {
    let p = c.p;
    let k = p.k;
    let bk = if SCALED { block_k(p) } else { k };
    let w = if SCALED { w } else { w.add(n * k) };
    let x = xb.add(m * k);
    let rs: [RowScales; R] = std::array::from_fn(|r| RowScales::new(p, n + r));
    let mut total = [[_mm512_setzero_ps(); C]; R];
    let (mut k0, mut kb) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = k0;
        while kk < k1 {
            let left = k1 - kk;
            let mask: __mmask32 = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
            let mut xv = [as_bh(_mm512_setzero_si512()); C];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = as_bh(_mm512_maskz_loadu_epi16(mask, x.add(j * k + kk) as *const i16));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                if !SCALED {
                    // The next tile's rows, a line each per step: by the end of a pass over
                    // these rows they are in cache (a few input rows per weight row leave
                    // the tiles latency-bound on four cold streams otherwise).
                    _mm_prefetch::<_MM_HINT_NTA>(w.wrapping_add(R * k + r * k + kk) as *const i8);
                }
                let wv = as_bh(_mm512_maskz_loadu_epi16(mask, w.add(r * k + kk) as *const i16));
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm512_dpbf16_ps(*a, wv, xv[j]);
                }
            }
            kk += 32;
        }
        fold_block(&mut total, &acc, &rs, kb, SCALED);
        k0 = k1;
        kb += 1;
    }
    store_tile(c, &total, n, m);
}

/// bf16 weights × one bf16 input row with `vdpbf16ps`, a row at a time, four accumulators deep
/// (128 weights a step), streamed as in [`row`]. Half the
/// loads and a quarter of the arithmetic of [`row`]'s widening to f32: from cache a 2.4 MB
/// product reads at ~118 GB/s on 2 Zen 4 threads where [`row`] reads at ~87 (it is
/// arithmetic-bound there), which matters for the parts of a weight that the pool's prefetch
/// hint brought into cache ([`crate::pool::Pool::prefetch`]); a decode step measured 2-6%
/// shorter in one process, alternating the two.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")]
unsafe fn sweep_dp_row(c: &Cols, xb: *const u16, w: *const u16, m: usize) {
    let p = c.p;
    let k = p.k;
    let x = xb.add(m * k);
    for n in c.n0..c.n1 {
        let w = w.add(n * k);
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut kk = 0;
        while kk + 128 <= k {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = kk + 32 * u;
                let wv = as_bh(_mm512_loadu_si512(w.add(o) as *const _));
                *a = _mm512_dpbf16_ps(*a, wv, as_bh(_mm512_loadu_si512(x.add(o) as *const _)));
            }
            kk += 128;
        }
        while kk < k {
            let left = k - kk;
            let mask: __mmask32 = if left >= 32 { u32::MAX } else { (1u32 << left) - 1 };
            let wv = as_bh(_mm512_maskz_loadu_epi16(mask, w.add(kk) as *const i16));
            let xv = as_bh(_mm512_maskz_loadu_epi16(mask, x.add(kk) as *const i16));
            acc[0] = _mm512_dpbf16_ps(acc[0], wv, xv);
            kk += 32;
        }
        let a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        *c.out.add(m * p.n + n) = _mm512_reduce_add_ps(a);
    }
}

/// 32 bf16 bit patterns as the `vdpbf16ps` operand type.
#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 plain bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// The four 64-byte halves of [`fp8::BF16_HI`] / [`fp8::BF16_LO`] in registers.
struct Lut {
    hi: (__m512i, __m512i),
    lo: (__m512i, __m512i),
}

#[inline(always)]
unsafe fn lut() -> Lut {
    let ld = |t: &[u8; 128], o: usize| _mm512_loadu_si512(t.as_ptr().add(o) as *const _);
    Lut {
        hi: (ld(&fp8::BF16_HI, 0), ld(&fp8::BF16_HI, 64)),
        lo: (ld(&fp8::BF16_LO, 0), ld(&fp8::BF16_LO, 64)),
    }
}

/// 64 e4m3 codes → 64 bf16 (two vectors) by two 128-entry byte lookups and the sign ORed back:
/// exact for every code, 5 instructions per 64 weights (the f16 route takes 20). The words come
/// out in `vpunpck` order, not memory order: see [`lut_order`].
#[inline(always)]
unsafe fn fp8_lut_bf16(b: __m512i, t: &Lut) -> (__m512i, __m512i) {
    let hi = _mm512_permutex2var_epi8(t.hi.0, b, t.hi.1);
    let lo = _mm512_permutex2var_epi8(t.lo.0, b, t.lo.1);
    // hi | (b & 0x80): the sign bit.
    let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, b, _mm512_set1_epi8(0x80u8 as i8));
    (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi))
}

/// One input row (bf16, `k` values) rearranged per chunk of 64 into the order [`fp8_lut_bf16`]
/// produces weights (word j of the first vector is element 16·⌊j/8⌋ + j mod 8, of the second
/// 8 more), zero past `k`, so the products pair up. Done once per task: the weights it meets
/// are read once each, the activations once per row.
#[inline(always)]
unsafe fn lut_order(x: *const u16, k: usize, out: &mut Vec<u16>) {
    let chunks = k.div_ceil(64);
    out.clear();
    out.resize(chunks * 64, 0);
    let lo: [i16; 32] = std::array::from_fn(|j| (16 * (j / 8) + j % 8) as i16);
    let (i0, i1) = (
        _mm512_loadu_si512(lo.as_ptr() as *const _),
        _mm512_add_epi16(_mm512_loadu_si512(lo.as_ptr() as *const _), _mm512_set1_epi16(8)),
    );
    for c in 0..chunks {
        let left = (k - 64 * c).min(64);
        let m = |o: usize| {
            if left >= o + 32 {
                u32::MAX
            } else if left > o {
                (1u32 << (left - o)) - 1
            } else {
                0
            }
        };
        let a = _mm512_maskz_loadu_epi16(m(0), x.add(64 * c) as *const i16);
        let b = _mm512_maskz_loadu_epi16(m(32), x.add(64 * c + 32) as *const i16);
        let dst = out.as_mut_ptr().add(64 * c) as *mut __m512i;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, i0, b));
        _mm512_storeu_si512(dst.add(1), _mm512_permutex2var_epi16(a, i1, b));
    }
}

/// One FP8 weight row against one bf16 input row (`xl`, in [`lut_order`]): decode's product.
/// Each 64 weights are one load, [`fp8_lut_bf16`] and two `vdpbf16ps`; the block scale is applied
/// per block of the reduction (whole chunks: the block length is a multiple of 64). One row at a
/// time, like [`row`]: on the routed experts at decode (memory-bound, 256 KiB matrices) it reads
/// at 42 GB/s where four interleaved rows read at 36.
#[inline(always)]
unsafe fn row_lut(c: &Cols, f: &crate::Fp8, xl: *const u16, n: usize, m: usize, t: &Lut) {
    let p = c.p;
    let k = p.k;
    let bk = f.block_k;
    let q = f.q.as_ptr().add(n * k);
    let rs = RowScales::new(p, n);
    let mut total = _mm512_setzero_ps();
    let (mut k0, mut kb) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut kk = k0;
        while kk < k1 {
            let left = k1 - kk;
            let src = q.add(kk);
            let b = if left >= 64 {
                _mm512_loadu_si512(src as *const _)
            } else {
                _mm512_maskz_loadu_epi8((1u64 << left) - 1, src as *const i8)
            };
            let (w0, w1) = fp8_lut_bf16(b, t);
            acc[0] = _mm512_dpbf16_ps(acc[0], as_bh(w0), as_bh(_mm512_loadu_si512(xl.add(kk) as *const _)));
            acc[1] =
                _mm512_dpbf16_ps(acc[1], as_bh(w1), as_bh(_mm512_loadu_si512(xl.add(kk + 32) as *const _)));
            kk += 64;
        }
        let s = _mm512_set1_ps(rs.at(kb).unwrap_or(1.0));
        total = _mm512_fmadd_ps(_mm512_add_ps(acc[0], acc[1]), s, total);
        k0 = k1;
        kb += 1;
    }
    *c.out.add(m * p.n + n) = _mm512_reduce_add_ps(total);
}

/// FP8 weights × one bf16 input row through the byte lookup ([`row_lut`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi,avx2,fma,f16c")]
unsafe fn sweep_fp8_lut(c: &Cols, xb: *const u16, f: &crate::Fp8, m: usize) {
    let k = c.p.k;
    let mut xl = Vec::new();
    lut_order(xb.add(m * k), k, &mut xl);
    let t = lut();
    for n in c.n0..c.n1 {
        row_lut(c, f, xl.as_ptr(), n, m, &t);
    }
}

/// FP8 weights × bf16 activations: each group of 4 weight rows is widened to bf16 once per pass of
/// input rows, then multiplied with `vdpbf16ps` (the widening, 5 instructions per 16 weights, is
/// paid once per weight instead of once per weight and input row).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi,avx2,fma,f16c")]
unsafe fn sweep_dp_fp8(c: &Cols, xb: *const u16, q: *const u8, m0: usize, m1: usize) {
    let k = c.p.k;
    let t = lut();
    let mut scratch = vec![0u16; 4 * k];
    let mut n = c.n0;
    while n < c.n1 {
        let r = if c.n1 - n >= 4 { 4 } else { 1 };
        for i in 0..r {
            widen_row_bf16(q.add((n + i) * k), k, scratch.as_mut_ptr().add(i * k), &t);
        }
        // The next group's rows load while this one is multiplied (as in `tile_dp_scaled`).
        if n + r < c.n1 {
            lead_in(q.add((n + r) * k), (4 * k).min((c.n1 - n - r) * k));
        }
        let w = scratch.as_ptr();
        let mut m = m0;
        while m < m1 {
            let cols = (m1 - m).min(3);
            match (r, cols) {
                (4, 3) => tile_dp_scaled::<true, 4, 3>(c, xb, w, n, m),
                (4, 2) => tile_dp_scaled::<true, 4, 2>(c, xb, w, n, m),
                (4, _) => tile_dp_scaled::<true, 4, 1>(c, xb, w, n, m),
                (_, 3) => tile_dp_scaled::<true, 1, 3>(c, xb, w, n, m),
                (_, 2) => tile_dp_scaled::<true, 1, 2>(c, xb, w, n, m),
                _ => tile_dp_scaled::<true, 1, 1>(c, xb, w, n, m),
            }
            m += cols;
        }
        n += r;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn sweep_f(c: &Cols, m0: usize, m1: usize) {
    match c.p.w {
        Weights::F32(w) => sweep::<F32>(c, w.as_ptr(), m0, m1),
        Weights::Bf16(w) => sweep::<Bf16>(c, w.as_ptr(), m0, m1),
        Weights::Fp8(f) => sweep::<Fp8>(c, f.q.as_ptr(), m0, m1),
    }
}

/// # Safety
/// The CPU has AVX-512F/BW/VL, F16C and FMA (and AVX512_BF16 when `dp`); `c.out` points to
/// `m * n` writable floats and no other thread writes columns `n0..n1`.
pub(crate) unsafe fn columns(c: &Cols, m0: usize, m1: usize, dp: bool) {
    match (c.p.w, c.p.x_bf16) {
        (Weights::Bf16(w), Some(xb)) if dp && m1 - m0 > 1 => sweep_dp(c, xb.as_ptr(), w.as_ptr(), m0, m1),
        (Weights::Bf16(w), Some(xb)) if dp => sweep_dp_row(c, xb.as_ptr(), w.as_ptr(), m0),
        (Weights::Fp8(f), Some(xb)) if dp && m1 - m0 > 1 => {
            sweep_dp_fp8(c, xb.as_ptr(), f.q.as_ptr(), m0, m1)
        }
        (Weights::Fp8(f), Some(xb)) if dp && f.block_k.is_multiple_of(64) => {
            sweep_fp8_lut(c, xb.as_ptr(), &f, m0)
        }
        _ => sweep_f(c, m0, m1),
    }
}
