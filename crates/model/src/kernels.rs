//! libtorch tensors in and out of the CPU kernels of `mlaserve-kernels`.
//!
//! On the CPU all heavy products of the forward pass go through here, and libtorch runs its
//! remaining (small, elementwise) ops on one thread: libtorch's OpenMP pool either busy-waits and
//! starves other threads or, made passive, pays a thread wake-up (tens to hundreds of µs) on every
//! small op, and its bf16 GEMMs are several times slower than f32 on CPUs without native bf16.
//! The kernel path (instruction set) is the process's, chosen once (`MLASERVE_KERNEL`).

use mlaserve_kernels::{Fp8, Problem, Weights};
use tch::{Device, Kind, Tensor};

pub use mlaserve_kernels::isa::{self, Isa};
pub use mlaserve_kernels::pool;

use crate::linear::Weight;

/// The elements of a contiguous CPU tensor of the matching kind.
fn elems<T>(t: &Tensor, kind: Kind) -> &[T] {
    assert_eq!(t.kind(), kind);
    assert!(t.is_contiguous() && t.device() == Device::Cpu);
    // SAFETY: a contiguous CPU tensor of `kind` holds numel() values of T at data_ptr(), alive as
    // long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// Whether `x · wᵀ` runs here: CPU tensors, a 2-D contiguous weight in bf16, f32 or FP8, and
/// activations of a float kind the kernels read.
pub fn use_for(x: &Tensor, w: &Weight) -> bool {
    let w_ok = match w {
        Weight::Dense(t) => {
            matches!(t.kind(), Kind::BFloat16 | Kind::Float) && t.dim() == 2 && t.is_contiguous()
        }
        Weight::Fp8 { q, scale, .. } => {
            q.kind() == Kind::Float8e4m3fn
                && q.is_contiguous()
                && scale.kind() == Kind::Float
                && scale.is_contiguous()
        }
    };
    w_ok && w.device() == Device::Cpu
        && x.device() == Device::Cpu
        && x.dim() == 2
        && matches!(x.kind(), Kind::BFloat16 | Kind::Float)
}

/// `x · wᵀ`; the result has `x`'s dtype.
pub fn linear(x: &Tensor, w: &Weight) -> Tensor {
    grouped_linear(&[(x, w)]).pop().expect("one product")
}

/// The kernels' view of a weight.
fn weights_of(w: &Weight) -> Weights<'_> {
    match w {
        Weight::Dense(t) if t.kind() == Kind::BFloat16 => Weights::Bf16(elems(t, Kind::BFloat16)),
        Weight::Dense(t) => Weights::F32(elems(t, Kind::Float)),
        Weight::Fp8 { q, scale, block } => Weights::Fp8(Fp8 {
            q: elems(q, Kind::Float8e4m3fn),
            scale: elems(scale, Kind::Float),
            block_n: block.0,
            block_k: block.1,
        }),
    }
}

/// Several independent `x_i · w_iᵀ` in one parallel region (each pair passes [`use_for`]).
pub fn grouped_linear(pairs: &[(&Tensor, &Weight)]) -> Vec<Tensor> {
    let xs: Vec<Tensor> = pairs.iter().map(|(x, _)| x.to_kind(Kind::Float).contiguous()).collect();
    // bf16 activations are exactly bf16: the kernels may multiply them as such (vdpbf16ps).
    let xbs: Vec<Option<Tensor>> =
        pairs.iter().map(|(x, _)| (x.kind() == Kind::BFloat16).then(|| x.contiguous())).collect();
    let shapes: Vec<(usize, usize, usize)> = pairs
        .iter()
        .map(|(x, w)| {
            let s = w.size();
            let (n, k) = (s[0] as usize, s[1] as usize);
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
    let problems: Vec<Problem> = xs
        .iter()
        .zip(&xbs)
        .zip(pairs)
        .zip(&shapes)
        .map(|(((x, xb), (_, w)), &(m, n, k))| Problem {
            x: elems(x, Kind::Float),
            x_bf16: xb.as_ref().map(|t| elems::<u16>(t, Kind::BFloat16)),
            w: weights_of(w),
            m,
            n,
            k,
        })
        .collect();
    mlaserve_kernels::grouped_gemm_into(&problems, &mut views);
    drop(problems);
    outs.into_iter()
        .zip(pairs)
        .map(|(o, (x, _))| if x.kind() == Kind::Float { o } else { o.to_kind(x.kind()) })
        .collect()
}

/// Paged latent attention (`mlaserve_kernels::attention`) of absorbed queries `qc [n, h, w]` (f32)
/// over `cache [slots, w]` (f32 or bf16) for `seqs`: `o_lat [n, h, value_width]` in f32.
pub(crate) fn latent_attention(
    qc: &Tensor,
    cache: &Tensor,
    seqs: &[crate::batch::PagedSeq],
    value_width: i64,
    scale: f64,
) -> Tensor {
    use mlaserve_kernels::attention::{CacheRows, LatentAttention, SeqKeys};
    let (n, h, w) = (qc.size()[0], qc.size()[1], qc.size()[2]);
    assert_eq!(cache.size()[1], w, "cache rows and queries differ in width");
    let rows = match cache.kind() {
        Kind::BFloat16 => CacheRows::Bf16(elems(cache, Kind::BFloat16)),
        _ => CacheRows::F32(elems(cache, Kind::Float)),
    };
    let keys: Vec<SeqKeys> =
        seqs.iter().map(|s| SeqKeys { row: s.row, new: s.new, cached: s.cached, slots: &s.slots }).collect();
    let o = mlaserve_kernels::attention::latent_attention(&LatentAttention {
        q: elems(qc, Kind::Float),
        cache: rows,
        heads: h as usize,
        width: w as usize,
        value_width: value_width as usize,
        scale: scale as f32,
        seqs: &keys,
    });
    Tensor::from_slice(&o).view([n, h, value_width])
}

/// Threads libtorch may use for its own ops next to the kernels' pool: one on the CPU (see the
/// module notes).
pub const LIBTORCH_CPU_THREADS: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    fn fp8_weight(n: i64, k: i64, block: (usize, usize)) -> Weight {
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
        let grid = [(n as usize).div_ceil(block.0) as i64, (k as usize).div_ceil(block.1) as i64];
        let scale = Tensor::rand(grid, (Kind::Float, Device::Cpu)) * 0.01 + 0.001;
        Weight::Fp8 { q: w.to_kind(Kind::Float8e4m3fn), scale, block }
    }

    /// Every weight format and activation kind on the process's kernel path, against libtorch in
    /// float64 on the same (dequantised) weights. The kernel crate tests each path against a
    /// float64 reference of its own; this checks the tensor glue.
    #[test]
    fn matches_libtorch_float64() {
        for (m, n, k) in [(1, 37, 13), (3, 130, 300), (16, 96, 64), (5, 257, 1000)] {
            let weights = [
                Weight::Dense(Tensor::randn([n, k], (Kind::Float, Device::Cpu))),
                Weight::Dense(Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)),
                fp8_weight(n, k, (128, 128)),
                fp8_weight(n, k, (16, 8)),
            ];
            for w in &weights {
                for xkind in [Kind::Float, Kind::BFloat16] {
                    let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(xkind);
                    assert!(use_for(&x, w));
                    let want = x.to_kind(Kind::Double).mm(&w.to_dense(Kind::Double).tr());
                    let got = linear(&x, w);
                    assert_eq!(got.kind(), xkind, "output keeps the input dtype");
                    let err = (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]);
                    let scale = want.abs().max().double_value(&[]).max(1.0);
                    let tol = if xkind == Kind::Float { 1e-5 } else { 1e-2 };
                    assert!(err / scale < tol, "m={m} n={n} k={k} {xkind:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn grouped_products_are_independent() {
        let a = Tensor::randn([5, 24], (Kind::Float, Device::Cpu));
        let wa = Weight::Dense(Tensor::randn([40, 24], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16));
        let b = Tensor::randn([2, 16], (Kind::BFloat16, Device::Cpu));
        let wb = fp8_weight(7, 16, (4, 4));
        let empty = Tensor::zeros([0, 16], (Kind::Float, Device::Cpu));
        let outs = grouped_linear(&[(&a, &wa), (&b, &wb), (&empty, &wb)]);
        assert_eq!(outs[1].kind(), Kind::BFloat16, "output keeps the input dtype");
        assert_eq!(outs[2].size(), vec![0, 7]);
        let ra = a.mm(&wa.to_dense(Kind::Float).tr());
        let rb = b.to_kind(Kind::Float).mm(&wb.to_dense(Kind::Float).tr());
        assert!((&outs[0] - ra).abs().max().double_value(&[]) < 1e-4);
        assert!((outs[1].to_kind(Kind::Float) - rb).abs().max().double_value(&[]) < 0.05);
    }
}
