//! The portable loop: any CPU, and the scalar edges of the SIMD paths. Same numbers as the SIMD
//! paths up to the order of the f32 additions.

use crate::{bf16_to_f32, fp8, Cols, Problem, Weights};

/// One weight element as the kernels read it (FP8: undershot by [`fp8::F16_UNDERSHOOT`], which
/// [`block_scale`] makes up).
#[inline(always)]
pub(crate) fn weight(w: &Weights, idx: usize) -> f32 {
    match w {
        Weights::F32(w) => w[idx],
        Weights::Bf16(w) => bf16_to_f32(w[idx]),
        Weights::Fp8(f) => fp8::undershot(f.q[idx]),
    }
}

/// The reduction's block length: the FP8 block, or all of K.
#[inline(always)]
pub(crate) fn block_k(p: &Problem) -> usize {
    match p.w {
        Weights::Fp8(f) => f.block_k,
        _ => p.k.max(1),
    }
}

/// The factor for row `n`'s reduction block `kb`; None when the weights are unscaled.
#[inline(always)]
pub(crate) fn block_scale(p: &Problem, n: usize, kb: usize) -> Option<f32> {
    match p.w {
        Weights::Fp8(f) => {
            let kblocks = p.k.div_ceil(f.block_k);
            Some(f.scale[(n / f.block_n) * kblocks + kb] * fp8::F16_UNDERSHOOT)
        }
        _ => None,
    }
}

/// # Safety
/// `c.out` must point to `m * n` writable floats and no other thread may write columns `n0..n1`.
pub(crate) unsafe fn columns(c: &Cols, m0: usize, m1: usize) {
    let p = c.p;
    let bk = block_k(p);
    for n in c.n0..c.n1 {
        for m in m0..m1 {
            let x = &p.x[m * p.k..(m + 1) * p.k];
            let mut total = 0f32;
            for (kb, k0) in (0..p.k).step_by(bk).enumerate() {
                let k1 = (k0 + bk).min(p.k);
                let s: f32 = (k0..k1).map(|k| x[k] * weight(&p.w, n * p.k + k)).sum();
                total += match block_scale(p, n, kb) {
                    Some(f) => s * f,
                    None => s,
                };
            }
            *c.out.add(m * p.n + n) = total;
        }
    }
}

/// Writes zeros into columns `n0..n1` (K = 0).
///
/// # Safety
/// As [`columns`].
pub(crate) unsafe fn zero_columns(p: &Problem, n0: usize, n1: usize, out: *mut f32) {
    for m in 0..p.m {
        for n in n0..n1 {
            *out.add(m * p.n + n) = 0.0;
        }
    }
}
