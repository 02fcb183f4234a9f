//! aarch64 NEON path: 4 lanes, the same loops as the AVX2 path (4 × 3 register tiles for several
//! input rows, a four-accumulator streaming row for one), scalar tails at the edges of each
//! reduction block.
//!
//! NEON is part of the aarch64 baseline, so the portable loops are already auto-vectorised there;
//! what this adds is the register tiling (each loaded weight vector serves three input rows) and
//! widening bf16/FP8 in registers. FP8 cannot take the f16 converter on stable Rust (`float16x4_t`
//! is unstable), so e4m3 is placed into f32 bits by shifts and then scaled by a power of two,
//! which is exact for every code, subnormals included (see [`Fp8::load4`]).
#![cfg(target_arch = "aarch64")]

use std::arch::aarch64::*;

use crate::portable::{block_k, weight, RowScales};
use crate::{Cols, Weights};

/// How one weight format is widened to 4 f32 lanes.
trait Fmt {
    type E;
    /// 4 weights at `p`.
    unsafe fn load(p: *const Self::E) -> float32x4_t;
    /// 16 weights as four vectors (FP8 widens 16 bytes together).
    #[inline(always)]
    unsafe fn load4(p: *const Self::E) -> [float32x4_t; 4] {
        [Self::load(p), Self::load(p.add(4)), Self::load(p.add(8)), Self::load(p.add(12))]
    }
}

struct F32;
struct Bf16;
struct Fp8;

impl Fmt for F32 {
    type E = f32;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        vld1q_f32(p)
    }
}

impl Fmt for Bf16 {
    type E = u16;
    #[inline(always)]
    unsafe fn load(p: *const u16) -> float32x4_t {
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p)))
    }
    #[inline(always)]
    unsafe fn load4(p: *const u16) -> [float32x4_t; 4] {
        let (a, b) = (vld1q_u16(p), vld1q_u16(p.add(8)));
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(a))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(a)),
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(b))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(b)),
        ]
    }
}

impl Fp8 {
    /// Sign-extended e4m3 codes (i32 lanes) → f32 with the value · 2⁻⁸.
    ///
    /// Shifted left by 20, the code's exponent and mantissa land in the f32 exponent's low four
    /// bits and the mantissa's top three, and the sign (extended) reaches bit 31; masking leaves
    /// exactly the value · 2⁻¹²⁰ — for subnormal codes too, as f32 subnormals — and the power of
    /// two lifts it exactly.
    #[inline(always)]
    unsafe fn place(v: int32x4_t) -> float32x4_t {
        let bits = vandq_s32(vshlq_n_s32::<20>(v), vdupq_n_s32(0x87F0_0000u32 as i32));
        vmulq_n_f32(vreinterpretq_f32_s32(bits), crate::fp8::LIFT)
    }
}

impl Fmt for Fp8 {
    type E = u8;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> float32x4_t {
        // Four bytes only: a longer load could run past the end of the weights.
        let b = vcreate_s8(u32::from_le_bytes(std::ptr::read_unaligned(p as *const [u8; 4])) as u64);
        Fp8::place(vmovl_s16(vget_low_s16(vmovl_s8(b))))
    }
    #[inline(always)]
    unsafe fn load4(p: *const u8) -> [float32x4_t; 4] {
        let b = vld1q_s8(p as *const i8);
        let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
        [
            Fp8::place(vmovl_s16(vget_low_s16(lo))),
            Fp8::place(vmovl_high_s16(lo)),
            Fp8::place(vmovl_s16(vget_low_s16(hi))),
            Fp8::place(vmovl_high_s16(hi)),
        ]
    }
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
    let (mut k0, mut kb) = (0, 0);
    while k0 < k {
        let k1 = (k0 + bk).min(k);
        let mut acc = [[vdupq_n_f32(0.0); C]; R];
        let mut kk = k0;
        while kk + 4 <= k1 {
            let xv: [float32x4_t; C] = std::array::from_fn(|j| vld1q_f32(x.add(j * k + kk)));
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = F::load(wrow.add(r * k + kk));
                for (j, a) in row.iter_mut().enumerate() {
                    *a = vfmaq_f32(*a, wv, xv[j]);
                }
            }
            kk += 4;
        }
        for (r, (trow, arow)) in total.iter_mut().zip(&acc).enumerate() {
            let f = rs[r].at(kb);
            for (j, (t, a)) in trow.iter_mut().zip(arow).enumerate() {
                let mut s = vaddvq_f32(*a);
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

/// One weight row against one input row, four accumulators deep: decode's product, one long
/// sequential read per task (the hardware prefetchers follow it).
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
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut kk = k0;
        while kk + 16 <= k1 {
            let wv = F::load4(w.add(kk));
            for (u, a) in acc.iter_mut().enumerate() {
                *a = vfmaq_f32(*a, wv[u], vld1q_f32(x.add(kk + 4 * u)));
            }
            kk += 16;
        }
        while kk + 4 <= k1 {
            acc[0] = vfmaq_f32(acc[0], F::load(w.add(kk)), vld1q_f32(x.add(kk)));
            kk += 4;
        }
        let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
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
/// The CPU has NEON; `c.out` points to `m * n` writable floats and no other thread writes columns
/// `n0..n1`.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn columns(c: &Cols, m0: usize, m1: usize) {
    match c.p.w {
        Weights::F32(w) => sweep::<F32>(c, w.as_ptr(), m0, m1),
        Weights::Bf16(w) => sweep::<Bf16>(c, w.as_ptr(), m0, m1),
        Weights::Fp8(f) => sweep::<Fp8>(c, f.q.as_ptr(), m0, m1),
    }
}
