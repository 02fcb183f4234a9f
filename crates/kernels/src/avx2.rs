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
/// How far ahead a lone row ([`row`] with `S = 1`) also prefetches into L2 only: more of the
/// stream in flight than L1's miss buffers hold. On Zen 3 (one-process A/B, 600 batch-1 steps):
/// 1.04-1.05× with it at 16 KiB, 1.03-1.04× at 32, 1.02-1.03× at 8. The same far prefetch in the
/// tiles (batched decode) was 14% slower.
const PF_FAR: usize = 16384;

/// `S` weight rows (1 or 2) against one input row, four accumulators deep per row, each row
/// prefetched ahead: decode's product, `S` long sequential reads per task.
///
/// Two rows share each activation load and keep two streams in flight ([`sweep_rows`] pairs the
/// two halves of a task's run). One row at a time, this loop is close to bound by its own
/// instructions on Zen 3: from cache (64 rows, 1 thread) it read at 23.4 GB/s against a plain
/// read's 40, so a memory-bound product could not overlap its arithmetic with the stream
/// (1×32768×1024 bf16, `kernel_bench`: 1.58× a plain read of its bytes on 1 thread, 1.29× on 2).
/// Two rows at once (L1 prefetch only): 1.15× and 1.03×. On Zen 5 (`MLASERVE_KERNEL=avx2`) the
/// one-row loop already reads at memory speed; there the pairs measured 0.95-1.00 over 600
/// batch-1 steps in one process (repeats of one A/B differed by up to 8 points that hour), with
/// the L2 prefetch on both streams 0.94-0.97.
#[inline(always)]
unsafe fn row<F: Fmt, const S: usize>(c: &Cols, w: *const F::E, ns: [usize; S], m: usize) {
    let p = c.p;
    let k = p.k;
    let bk = block_k(p);
    let x = p.x.as_ptr().add(m * k);
    let ws = ns.map(|n| w.add(n * k));
    let rs = ns.map(|n| RowScales::new(p, n));
    let mut total = [0f32; S];
    let (mut k0, mut kb) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [[_mm256_setzero_ps(); 4]; S];
        let mut kk = k0;
        while kk + 32 <= k1 {
            for w in ws {
                _mm_prefetch::<_MM_HINT_T0>((w.add(kk) as *const i8).add(PF));
                if S == 1 {
                    _mm_prefetch::<_MM_HINT_T1>((w.add(kk) as *const i8).add(PF_FAR));
                }
            }
            for u in [0, 2] {
                let o = kk + 8 * u;
                let (x0, x1) = (_mm256_loadu_ps(x.add(o)), _mm256_loadu_ps(x.add(o + 8)));
                for (a, w) in acc.iter_mut().zip(ws) {
                    let (w0, w1) = F::load2(w.add(o));
                    a[u] = _mm256_fmadd_ps(w0, x0, a[u]);
                    a[u + 1] = _mm256_fmadd_ps(w1, x1, a[u + 1]);
                }
            }
            kk += 32;
        }
        while kk + 8 <= k1 {
            let xv = _mm256_loadu_ps(x.add(kk));
            for (a, w) in acc.iter_mut().zip(ws) {
                a[0] = _mm256_fmadd_ps(F::load(w.add(kk)), xv, a[0]);
            }
            kk += 8;
        }
        for s in 0..S {
            let a = &acc[s];
            let mut v = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
            for q in kk..k1 {
                v += *x.add(q) * weight(&p.w, ns[s] * k + q);
            }
            total[s] += match rs[s].at(kb) {
                Some(f) => v * f,
                None => v,
            };
        }
        k0 = k1;
        kb += 1;
    }
    for (n, t) in ns.into_iter().zip(total) {
        *c.out.add(m * p.n + n) = t;
    }
}

/// Decode's order for two weight streams at once: row `i` of the run's first half beside row `i`
/// of its second half (two distant sequential reads), then the odd row alone.
#[inline(always)]
fn stream_pairs(n0: usize, n1: usize) -> (impl Iterator<Item = [usize; 2]>, Option<usize>) {
    let h = (n1 - n0) / 2;
    ((0..h).map(move |i| [n0 + i, n0 + h + i]), ((n1 - n0) % 2 == 1).then_some(n1 - 1))
}

/// One input row over the task's columns: two rows at a time ([`row`]).
#[inline(always)]
unsafe fn sweep_rows<F: Fmt>(c: &Cols, w: *const F::E, m: usize) {
    let (pairs, odd) = stream_pairs(c.n0, c.n1);
    for ns in pairs {
        row::<F, 2>(c, w, ns, m);
    }
    if let Some(n) = odd {
        row::<F, 1>(c, w, [n], m);
    }
}

four_by_three_sweep!(own_rows);

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

#[cfg(test)]
mod tests {
    use super::stream_pairs;

    /// Every row of the run once: pairs `h` apart, the odd row last.
    #[test]
    fn stream_pairs_cover_the_run_once() {
        for (n0, n1) in [(0, 0), (3, 4), (0, 7), (10, 20), (5, 38)] {
            let (pairs, odd) = stream_pairs(n0, n1);
            let pairs: Vec<[usize; 2]> = pairs.collect();
            assert!(pairs.iter().all(|[a, b]| b - a == (n1 - n0) / 2));
            let mut all: Vec<usize> = pairs.iter().flatten().copied().chain(odd).collect();
            all.sort();
            assert_eq!(all, (n0..n1).collect::<Vec<_>>());
            assert_eq!(odd.is_some(), (n1 - n0) % 2 == 1);
        }
    }
}
