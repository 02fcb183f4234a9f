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

/// Row `n`'s FP8 block scales (one per block of the reduction), found once per row: the loops
/// scale every block, and finding the grid row takes a division.
#[derive(Clone, Copy)]
pub(crate) struct RowScales<'a>(Option<&'a [f32]>);

impl<'a> RowScales<'a> {
    #[inline(always)]
    pub(crate) fn new(p: &Problem<'a>, n: usize) -> Self {
        RowScales(match p.w {
            Weights::Fp8(f) => {
                let kblocks = p.k.div_ceil(f.block_k);
                let r = n / f.block_n * kblocks;
                Some(&f.scale[r..r + kblocks])
            }
            _ => None,
        })
    }

    /// The factor for reduction block `kb` (with the f16 route's 2⁸); None when unscaled.
    #[inline(always)]
    pub(crate) fn at(&self, kb: usize) -> Option<f32> {
        self.0.map(|s| s[kb] * fp8::F16_UNDERSHOOT)
    }
}

/// # Safety
/// `c.out` must point to `m * n` writable floats and no other thread may write columns `n0..n1`.
pub(crate) unsafe fn columns(c: &Cols, m0: usize, m1: usize) {
    let p = c.p;
    let bk = block_k(p);
    for n in c.n0..c.n1 {
        let rs = RowScales::new(p, n);
        for m in m0..m1 {
            let x = &p.x[m * p.k..(m + 1) * p.k];
            let mut total = 0f32;
            for (kb, k0) in (0..p.k).step_by(bk).enumerate() {
                let k1 = (k0 + bk).min(p.k);
                let s: f32 = (k0..k1).map(|k| x[k] * weight(&p.w, n * p.k + k)).sum();
                total += match rs.at(kb) {
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
