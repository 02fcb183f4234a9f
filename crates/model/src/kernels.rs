//! CPU matrix products `y = x · Wᵀ` for the model's weights, parallel on the kernel pool ([`crate::pool`]).
//!
//! On the CPU all heavy products of the forward pass go through here, and libtorch runs its
//! remaining (small, elementwise) ops on one thread: libtorch's OpenMP pool either busy-waits and
//! starves other threads or, made passive, pays a thread wake-up (tens to hundreds of µs) on every
//! small op, and its bf16 GEMMs are several times slower than f32 on CPUs without native bf16.
//!
//! `W` is `[N, K]` row-major (the checkpoint layout) in bf16 or f32, `x` is `[M, K]`. Weights are
//! widened to f32 in registers (bf16 is a 16-bit shift) and accumulated in f32 with AVX2/FMA; each
//! loaded weight vector serves up to three rows of `x`. Work is split over output rows on
//! [`crate::pool`]; several independent products (the experts of a layer, the heads of an
//! absorption) run as one parallel region. Without AVX2/FMA a portable loop computes the same
//! thing. libtorch is the reference in the tests.

use tch::{Device, Kind, Tensor};

use crate::pool;

/// A weight element type the kernels read.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl WeightElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// One product of a group: `y[m, n] = Σ_k x[m, k] · w[n, k]`.
pub struct Problem<'a, W> {
    /// `[M, K]` f32, row-major.
    pub x: &'a [f32],
    /// `[N, K]` (bf16 bits or f32), row-major.
    pub w: &'a [W],
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

/// Runs every problem into caller-provided `[M, N]` f32 outputs.
pub fn grouped_gemm_into<W: WeightElem>(problems: &[Problem<W>], outs: &mut [&mut [f32]]) {
    assert_eq!(problems.len(), outs.len());
    for (i, (p, o)) in problems.iter().zip(outs.iter()).enumerate() {
        assert!(o.len() >= p.m * p.n, "problem {i}: output buffer too small");
        assert!(p.x.len() >= p.m * p.k && p.w.len() >= p.n * p.k, "problem {i}: buffers too small");
    }
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize, usize)> = problems
        .iter()
        .enumerate()
        .filter(|(_, p)| p.m > 0)
        .flat_map(|(i, p)| {
            (0..p.n).step_by(ROWS_PER_TASK).map(move |n0| (i, n0, (n0 + ROWS_PER_TASK).min(p.n)))
        })
        .collect();
    let simd = simd_available();
    let run = |&(i, n0, n1): &(usize, usize, usize)| {
        let p = &problems[i];
        let out = ptrs[i];
        // SAFETY: columns n0..n1 of this problem's output belong to this task alone; the buffer
        // outlives the parallel region; sizes were checked above.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if simd {
                return avx2::columns(p, n0, n1, out.0);
            }
            let _ = simd;
            portable_columns(p, n0, n1, out.0)
        }
    };
    pool::global().for_each(tasks.len(), &|t| run(&tasks[t]));
}

/// # Safety
/// `out` must point to `m * n` writable floats and no other thread may write columns `n0..n1`.
unsafe fn portable_columns<W: WeightElem>(p: &Problem<W>, n0: usize, n1: usize, out: *mut f32) {
    for n in n0..n1 {
        let w = &p.w[n * p.k..(n + 1) * p.k];
        for m in 0..p.m {
            let x = &p.x[m * p.k..(m + 1) * p.k];
            let s: f32 = x.iter().zip(w).map(|(a, &b)| a * b.to_f32()).sum();
            *out.add(m * p.n + n) = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::any::TypeId;
    use std::arch::x86_64::*;

    use super::{Problem, WeightElem};

    /// Eight weights widened to f32.
    #[inline(always)]
    unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
        if TypeId::of::<W>() == TypeId::of::<u16>() {
            let v = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
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
    unsafe fn tile<W: WeightElem, const R: usize, const C: usize>(
        p: &Problem<W>,
        n: usize,
        m: usize,
        out: *mut f32,
    ) {
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
                let wv = load8(w.add(r * k + kk));
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
                    s += *x.add(c * k + t) * (*w.add(r * k + t)).to_f32();
                }
                *out.add((m + c) * p.n + n + r) = s;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns<W: WeightElem>(p: &Problem<W>, n0: usize, n1: usize, out: *mut f32) {
        let mut n = n0;
        while n < n1 {
            let r = (n1 - n).min(4);
            let mut m = 0;
            while m < p.m {
                let c = (p.m - m).min(3);
                match (r, c) {
                    (4, 3) => tile::<W, 4, 3>(p, n, m, out),
                    (4, 2) => tile::<W, 4, 2>(p, n, m, out),
                    (4, 1) => tile::<W, 4, 1>(p, n, m, out),
                    (_, 3) => tile::<W, 1, 3>(p, n, m, out),
                    (_, 2) => tile::<W, 1, 2>(p, n, m, out),
                    _ => tile::<W, 1, 1>(p, n, m, out),
                }
                m += c;
            }
            n += if r == 4 { 4 } else { 1 };
        }
    }
}

/// The elements of a contiguous CPU tensor of the matching kind.
fn elems<T>(t: &Tensor, kind: Kind) -> &[T] {
    assert_eq!(t.kind(), kind);
    assert!(t.is_contiguous() && t.device() == Device::Cpu);
    // SAFETY: a contiguous CPU tensor of `kind` holds numel() values of T at data_ptr(), alive as
    // long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// Whether `x · wᵀ` runs here: CPU weights in bf16 or f32, contiguous, with AVX2/FMA available.
pub fn use_for(x: &Tensor, w: &Tensor) -> bool {
    matches!(w.kind(), Kind::BFloat16 | Kind::Float)
        && w.device() == Device::Cpu
        && x.device() == Device::Cpu
        && w.dim() == 2
        && w.is_contiguous()
        && simd_available()
}

/// `x · wᵀ`; the result has `x`'s dtype.
pub fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    grouped_linear(&[(x, w)]).pop().expect("one product")
}

/// Several independent `x_i · w_iᵀ` in one parallel region (all weights of one kind).
pub fn grouped_linear(pairs: &[(&Tensor, &Tensor)]) -> Vec<Tensor> {
    let xs: Vec<Tensor> = pairs.iter().map(|(x, _)| x.to_kind(Kind::Float).contiguous()).collect();
    let shapes: Vec<(usize, usize, usize)> = pairs
        .iter()
        .map(|(x, w)| {
            let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
            assert_eq!(x.size()[1] as usize, k, "inner dimensions differ");
            (x.size()[0] as usize, n, k)
        })
        .collect();
    let outs: Vec<Tensor> = shapes
        .iter()
        .map(|&(m, n, _)| Tensor::empty([m as i64, n as i64], (Kind::Float, Device::Cpu)))
        .collect();
    let mut views: Vec<&mut [f32]> = outs
        .iter()
        .map(|o| {
            // SAFETY: freshly allocated contiguous f32 tensors, each viewed once, alive below.
            unsafe { std::slice::from_raw_parts_mut(o.data_ptr() as *mut f32, o.numel()) }
        })
        .collect();
    let kind = pairs.first().map(|(_, w)| w.kind()).unwrap_or(Kind::Float);
    assert!(pairs.iter().all(|(_, w)| w.kind() == kind), "mixed weight kinds in one group");
    macro_rules! run {
        ($t:ty) => {{
            let problems: Vec<Problem<$t>> = xs
                .iter()
                .zip(pairs)
                .zip(&shapes)
                .map(|((x, (_, w)), &(m, n, k))| Problem {
                    x: elems(x, Kind::Float),
                    w: elems(w, kind),
                    m,
                    n,
                    k,
                })
                .collect();
            grouped_gemm_into(&problems, &mut views)
        }};
    }
    match kind {
        Kind::BFloat16 => run!(u16),
        Kind::Float => run!(f32),
        other => panic!("kernels take bf16 or f32 weights, not {other:?}"),
    }
    outs.into_iter()
        .zip(pairs)
        .map(|(o, (x, _))| if x.kind() == Kind::Float { o } else { o.to_kind(x.kind()) })
        .collect()
}

/// Threads libtorch may use for its own ops next to the kernels' pool: one on the CPU (see the
/// module notes).
pub const LIBTORCH_CPU_THREADS: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(m: i64, n: i64, k: i64, wkind: Kind) {
        let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(wkind);
        let want = x.to_kind(Kind::Double).mm(&w.to_kind(Kind::Double).tr());
        let got = linear(&x, &w).to_kind(Kind::Double);
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1.0);
        assert!(err / scale < 1e-5, "m={m} n={n} k={k} {wkind:?}: {err}");
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        for kind in [Kind::BFloat16, Kind::Float] {
            for (m, n, k) in [
                (1, 1, 1),
                (1, 37, 13),
                (2, 64, 256),
                (3, 5, 8),
                (7, 129, 1000),
                (16, 96, 64),
                (33, 70, 9),
                (130, 40, 24),
            ] {
                check(m, n, k, kind);
            }
        }
    }

    #[test]
    fn grouped_products_are_independent() {
        let a = Tensor::randn([5, 24], (Kind::Float, Device::Cpu));
        let wa = Tensor::randn([40, 24], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let b = Tensor::randn([2, 16], (Kind::BFloat16, Device::Cpu));
        let wb = Tensor::randn([7, 16], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let empty = Tensor::zeros([0, 16], (Kind::Float, Device::Cpu));
        let outs = grouped_linear(&[(&a, &wa), (&b, &wb), (&empty, &wb)]);
        assert_eq!(outs[1].kind(), Kind::BFloat16, "output keeps the input dtype");
        assert_eq!(outs[2].size(), vec![0, 7]);
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
        let mut simd = vec![0f32; 27];
        grouped_gemm_into(std::slice::from_ref(&p), &mut [simd.as_mut_slice()]);
        let mut port = vec![0f32; 27];
        // SAFETY: 27 floats, one caller.
        unsafe { portable_columns(&p, 0, 9, port.as_mut_ptr()) };
        for (a, b) in simd.iter().zip(&port) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
