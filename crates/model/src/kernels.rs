//! CPU matrix products with bf16 weights for small row counts (decode, per-expert and per-head
//! products), where libtorch's bf16 kernels are slow on CPUs without native bf16 arithmetic.
//!
//! `y = x · Wᵀ` with `W` `[N, K]` bf16 row-major (the checkpoint layout) and `x` `[M, K]`. Weights are
//! widened to f32 in registers (a 16-bit shift) and accumulated in f32 with AVX2/FMA; each loaded
//! weight vector is reused for up to three rows of `x`. Work is split over output rows on the rayon
//! pool. Several independent products (the experts of a layer, the heads of an absorption) run as
//! one parallel region. Without AVX2/FMA a portable loop computes the same thing; libtorch stays the
//! reference in the tests.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// One product of a group: `y[m, n] = Σ_k x[m, k] · w[n, k]`.
pub struct Problem<'a> {
    /// `[M, K]` f32, row-major.
    pub x: &'a [f32],
    /// `[N, K]` bf16 bits, row-major.
    pub w: &'a [u16],
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Output rows per task: enough to amortise scheduling, small enough to spread over the cores.
const ROWS_PER_TASK: usize = 32;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its own rows of W, i.e. columns of y).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Whether the vectorised path can run here.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs every problem; returns one `[M, N]` f32 output per problem.
pub fn grouped_gemm(problems: &[Problem]) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = problems.iter().map(|p| vec![0f32; p.m * p.n]).collect();
    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    grouped_gemm_into(problems, &mut views);
    outs
}

/// Runs every problem into caller-provided `[M, N]` f32 outputs.
pub fn grouped_gemm_into(problems: &[Problem], outs: &mut [&mut [f32]]) {
    assert_eq!(problems.len(), outs.len());
    for (p, o) in problems.iter().zip(outs.iter()) {
        assert!(o.len() >= p.m * p.n, "output buffer too small");
    }
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize, usize)> = problems
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            (0..p.n).step_by(ROWS_PER_TASK).map(move |n0| (i, n0, (n0 + ROWS_PER_TASK).min(p.n)))
        })
        .collect();
    let simd = simd_available();
    let run = |&(i, n0, n1): &(usize, usize, usize)| {
        let p = &problems[i];
        assert!(p.x.len() >= p.m * p.k && p.w.len() >= p.n * p.k, "problem {i}: buffers too small");
        let out = ptrs[i];
        // SAFETY: rows n0..n1 of this problem's output columns belong to this task alone; the
        // buffer outlives the parallel region; lengths were checked above.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if simd {
                return avx2::columns(p, n0, n1, out.0);
            }
            let _ = simd;
            portable_columns(p, n0, n1, out.0)
        }
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// # Safety
/// `out` must point to `m * n` writable floats and no other thread may write columns `n0..n1`.
unsafe fn portable_columns(p: &Problem, n0: usize, n1: usize, out: *mut f32) {
    for n in n0..n1 {
        let w = &p.w[n * p.k..(n + 1) * p.k];
        for m in 0..p.m {
            let x = &p.x[m * p.k..(m + 1) * p.k];
            let s: f32 = x.iter().zip(w).map(|(a, &b)| a * f32::from_bits((b as u32) << 16)).sum();
            *out.add(m * p.n + n) = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Problem;

    #[inline(always)]
    unsafe fn widen(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        ))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// R weight rows × C input rows over the whole K.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(p: &Problem, n: usize, m: usize, out: *mut f32) {
        let k = p.k;
        let w = p.w.as_ptr().add(n * k);
        let x = p.x.as_ptr().add(m * k);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk + 8 <= k {
            let mut xv = [_mm256_setzero_ps(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(c * k + kk));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = widen(w.add(r * k + kk));
                for (c, a) in row.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, xv[c], *a);
                }
            }
            kk += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let mut s = hsum(*a);
                for t in kk..k {
                    s += *x.add(c * k + t) * f32::from_bits((*w.add(r * k + t) as u32) << 16);
                }
                *out.add((m + c) * p.n + n + r) = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns(p: &Problem, n0: usize, n1: usize, out: *mut f32) {
        let mut n = n0;
        while n < n1 {
            let r = (n1 - n).min(4);
            let mut m = 0;
            while m < p.m {
                let c = (p.m - m).min(3);
                match (r, c) {
                    (4, 3) => tile::<4, 3>(p, n, m, out),
                    (4, 2) => tile::<4, 2>(p, n, m, out),
                    (4, 1) => tile::<4, 1>(p, n, m, out),
                    (_, 3) => tile::<1, 3>(p, n, m, out),
                    (_, 2) => tile::<1, 2>(p, n, m, out),
                    _ => tile::<1, 1>(p, n, m, out),
                }
                m += c;
            }
            n += if r == 4 { 4 } else { 1 };
        }
    }
}

/// The bf16 bits of a contiguous CPU tensor.
pub fn bf16_bits(t: &Tensor) -> &[u16] {
    assert_eq!(t.kind(), Kind::BFloat16);
    assert!(t.is_contiguous() && t.device() == Device::Cpu);
    // SAFETY: a contiguous CPU bf16 tensor is numel() u16 values at data_ptr(), alive as long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u16, t.numel()) }
}

/// `x · wᵀ` for bf16 `w` `[N, K]` on the CPU; the result has `x`'s dtype.
pub fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    grouped_linear(&[(x, w)]).pop().expect("one product")
}

/// Several independent `x_i · w_iᵀ` in one parallel region.
pub fn grouped_linear(pairs: &[(&Tensor, &Tensor)]) -> Vec<Tensor> {
    let xs: Vec<Tensor> = pairs.iter().map(|(x, _)| x.to_kind(Kind::Float).contiguous()).collect();
    let xs_f32: Vec<&[f32]> = xs
        .iter()
        .map(|x| {
            // SAFETY: contiguous f32 CPU tensor, alive for this function.
            unsafe { std::slice::from_raw_parts(x.data_ptr() as *const f32, x.numel()) }
        })
        .collect();
    let problems: Vec<Problem> = pairs
        .iter()
        .zip(&xs_f32)
        .map(|((x, w), xf)| {
            let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
            let m = x.size()[0] as usize;
            assert_eq!(x.size()[1] as usize, k, "inner dimensions differ");
            Problem { x: xf, w: bf16_bits(w), m, n, k }
        })
        .collect();
    let outs: Vec<Tensor> = problems
        .iter()
        .map(|p| Tensor::empty([p.m as i64, p.n as i64], (Kind::Float, Device::Cpu)))
        .collect();
    let mut views: Vec<&mut [f32]> = outs
        .iter()
        .map(|o| {
            // SAFETY: freshly allocated contiguous f32 tensors, each viewed once, alive below.
            unsafe { std::slice::from_raw_parts_mut(o.data_ptr() as *mut f32, o.numel()) }
        })
        .collect();
    grouped_gemm_into(&problems, &mut views);
    outs.into_iter()
        .zip(pairs)
        .map(|(o, (x, _))| if x.kind() == Kind::Float { o } else { o.to_kind(x.kind()) })
        .collect()
}

/// Whether `x · wᵀ` should take the bf16 kernel: bf16 weights on the CPU, few rows.
pub fn use_for(x: &Tensor, w: &Tensor) -> bool {
    w.kind() == Kind::BFloat16
        && w.device() == Device::Cpu
        && x.size()[0] as usize <= MAX_ROWS
        && w.is_contiguous()
        && simd_available()
}

/// Above this many rows libtorch's blocked GEMM (on an f32 copy of the weight) is faster.
pub const MAX_ROWS: usize = 48;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(m: i64, n: i64, k: i64) {
        let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let want = x.to_kind(Kind::Double).mm(&w.to_kind(Kind::Double).tr());
        let got = linear(&x, &w).to_kind(Kind::Double);
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1.0);
        assert!(err / scale < 1e-5, "m={m} n={n} k={k}: {err}");
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        for (m, n, k) in
            [(1, 1, 1), (1, 37, 13), (2, 64, 256), (3, 5, 8), (7, 129, 1000), (16, 96, 64), (33, 70, 9)]
        {
            check(m, n, k);
        }
    }

    #[test]
    fn grouped_products_are_independent() {
        let a = Tensor::randn([5, 24], (Kind::Float, Device::Cpu));
        let wa = Tensor::randn([40, 24], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let b = Tensor::randn([2, 16], (Kind::BFloat16, Device::Cpu));
        let wb = Tensor::randn([7, 16], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let outs = grouped_linear(&[(&a, &wa), (&b, &wb)]);
        assert_eq!(outs[1].kind(), Kind::BFloat16, "output keeps the input dtype");
        let ra = a.mm(&wa.to_kind(Kind::Float).tr());
        let rb = b.to_kind(Kind::Float).mm(&wb.to_kind(Kind::Float).tr());
        assert!((&outs[0] - ra).abs().max().double_value(&[]) < 1e-4);
        assert!((outs[1].to_kind(Kind::Float) - rb).abs().max().double_value(&[]) < 0.05);
    }

    #[test]
    fn portable_path_agrees_with_simd() {
        let x: Vec<f32> = (0..3 * 20).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<u16> = (0..9 * 20).map(|i| ((i as f32 * 0.11).cos().to_bits() >> 16) as u16).collect();
        let p = Problem { x: &x, w: &w, m: 3, n: 9, k: 20 };
        let simd = grouped_gemm(std::slice::from_ref(&p)).remove(0);
        let mut port = vec![0f32; 27];
        // SAFETY: 27 floats, one caller.
        unsafe { portable_columns(&p, 0, 9, port.as_mut_ptr()) };
        for (a, b) in simd.iter().zip(&port) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
