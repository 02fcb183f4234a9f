//! Weights of the matrix products in their stored format, and the bias-free linear layer over them.

use tch::{Device, Kind, Tensor};

use crate::host_step::{self, HostAct};
use crate::kernels;
use crate::weights::dequantize_fp8;

/// A `[out, in]` weight as held in memory: a plain tensor, or FP8 e4m3 with its block scales
/// (`--weights native` on an FP8 checkpoint).
pub enum Weight {
    Dense(Tensor),
    Fp8 {
        /// `[out, in]`, `Kind::Float8e4m3fn`.
        q: Tensor,
        /// `[ceil(out / block_out), ceil(in / block_in)]` f32 (`weight_scale_inv`).
        scale: Tensor,
        block: (usize, usize),
    },
}

impl Weight {
    /// `[out, in]`.
    pub fn size(&self) -> Vec<i64> {
        match self {
            Weight::Dense(t) | Weight::Fp8 { q: t, .. } => t.size(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(t) | Weight::Fp8 { q: t, .. } => t.device(),
        }
    }

    /// Bytes held (scales included).
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        match self {
            Weight::Dense(t) => b(t),
            Weight::Fp8 { q, scale, .. } => b(q) + b(scale),
        }
    }

    /// The weight as a plain tensor of `kind` (FP8: dequantised, exactly in f32 first).
    pub fn to_dense(&self, kind: Kind) -> Tensor {
        match self {
            Weight::Dense(t) => t.to_kind(kind),
            Weight::Fp8 { q, scale, block } => {
                dequantize_fp8(q, scale, block.0, block.1).expect("scale grid checked at load").to_kind(kind)
            }
        }
    }

    /// The same weight on `device`.
    pub fn to_device(&self, device: Device) -> Weight {
        self.map(|t| t.to_device(device))
    }

    /// Its tensors (FP8: the codes, then the scales), to move them (see `huge_pages::pack`).
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Weight::Dense(t) => vec![t],
            Weight::Fp8 { q, scale, .. } => vec![q, scale],
        }
    }

    /// Another handle to the same storage.
    pub fn shallow_clone(&self) -> Weight {
        self.map(Tensor::shallow_clone)
    }

    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Weight {
        match self {
            Weight::Dense(t) => Weight::Dense(f(t)),
            Weight::Fp8 { q, scale, block } => Weight::Fp8 { q: f(q), scale: f(scale), block: *block },
        }
    }
}

/// A bias-free linear layer `y = x W^T` with `W` stored `[out, in]` as in the checkpoint. An
/// optional permutation of the outputs stands in for reordering the rows of an FP8 weight (whose
/// block scales a row permutation would break).
pub struct Linear {
    weight: Weight,
    out_perm: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear { weight: Weight::Dense(weight), out_perm: None }
    }

    pub fn from_weight(weight: Weight) -> Self {
        Linear { weight, out_perm: None }
    }

    /// `y[:, i] = (x Wᵀ)[:, rows[i]]`: the layer of `W` with its rows reordered by `rows`.
    pub fn with_row_order(weight: Weight, rows: Option<Tensor>) -> Self {
        match (weight, rows) {
            (Weight::Dense(t), Some(r)) => Linear::new(t.index_select(0, &r.to_device(t.device()))),
            (w, r) => {
                let dev = w.device();
                Linear { weight: w, out_perm: r.map(|r| r.to_device(dev)) }
            }
        }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Whether the kernels compute it (its permutation, if any, on the CPU): what the host form of
    /// a decode step takes (`host_step`).
    pub(crate) fn host_ready(&self) -> bool {
        kernels::weight_ok(&self.weight)
            && self.out_perm.as_ref().is_none_or(|p| p.device() == Device::Cpu && p.kind() == Kind::Int64)
    }

    /// Host rows of the product (`[T, out]` row-major, from `host_step::products`) in its output
    /// order: [`Linear::permuted`] on the host.
    pub(crate) fn permuted_host(&self, y: Vec<f32>) -> Vec<f32> {
        let Some(p) = &self.out_perm else { return y };
        let p = kernels::elems::<i64>(p, Kind::Int64);
        let mut out = vec![0f32; y.len()];
        for (o, r) in out.chunks_exact_mut(p.len()).zip(y.chunks_exact(p.len())) {
            for (v, &i) in o.iter_mut().zip(p) {
                *v = r[i as usize];
            }
        }
        out
    }

    /// [`Linear::forward`] on host rows `x [T, in]`, for a layer that is [`Linear::host_ready`].
    pub(crate) fn forward_host<T: HostAct>(&self, x: &[T]) -> Vec<T> {
        let y = host_step::products(&[(x, &self.weight)]).pop().expect("one product");
        T::rounded(&self.permuted_host(y))
    }

    pub(crate) fn weight_mut(&mut self) -> &mut Weight {
        &mut self.weight
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.permuted(forward_weight(x, &self.weight))
    }

    /// `forward(x).to_kind(Float)`: for a decode-sized `x` on the kernels in one pass (see
    /// [`kernels::linear_float`]).
    pub fn forward_float(&self, x: &Tensor) -> Tensor {
        if self.out_perm.is_none()
            && x.dim() == 2
            && kernels::use_for(x, &self.weight)
            && !crate::gemm_choice::candidate(x, &self.weight)
        {
            return kernels::linear_float(x, &self.weight);
        }
        self.forward(x).to_kind(Kind::Float)
    }

    fn permuted(&self, y: Tensor) -> Tensor {
        match &self.out_perm {
            Some(p) => y.index_select(-1, p),
            None => y,
        }
    }

    /// `(a.forward(x), b.forward(x))` for 2-D `x`; in one parallel region of the kernels where both
    /// run there and neither is a prefill-sized candidate for libtorch (decode: one start-up
    /// instead of two for a layer's two input projections).
    pub fn forward_pair(a: &Linear, b: &Linear, x: &Tensor) -> (Tensor, Tensor) {
        let together = x.dim() == 2
            && [a, b]
                .iter()
                .all(|l| kernels::use_for(x, &l.weight) && !crate::gemm_choice::candidate(x, &l.weight));
        if !together {
            return (a.forward(x), b.forward(x));
        }
        let mut ys = kernels::grouped_linear(&[(x, &a.weight), (x, &b.weight)]);
        let yb = ys.pop().expect("two products");
        let ya = ys.pop().expect("two products");
        (a.permuted(ya), b.permuted(yb))
    }
}

/// `x · wᵀ` for `x [.., in]`: on the CPU through [`kernels`]; elsewhere libtorch (FP8 dequantised
/// for each product: the weights stay FP8 in memory); without a SIMD kernel, bf16 CPU weights
/// multiply as f32 (libtorch's CPU bf16 GEMM is several times slower).
pub fn forward_weight(x: &Tensor, w: &Weight) -> Tensor {
    let shape = x.size();
    let x2 = if shape.len() == 2 { x.shallow_clone() } else { x.reshape([-1, shape[shape.len() - 1]]) };
    let y = if kernels::use_for(&x2, w) {
        kernels::linear(&x2, w)
    } else {
        match w {
            Weight::Dense(t) if t.kind() == Kind::BFloat16 && t.device() == Device::Cpu => {
                x2.to_kind(Kind::Float).linear::<Tensor>(&t.to_kind(Kind::Float), None).to_kind(x.kind())
            }
            Weight::Dense(t) => x2.linear::<Tensor>(&t.to_kind(x.kind()), None),
            fp8 => {
                // On a GPU, bf16/f16 activations multiply the weight dequantised to their type (the
                // reference's dequantised bf16 weights, on tensor cores); otherwise f32 (f64 stays).
                let kind = match x.kind() {
                    Kind::Double => Kind::Double,
                    k @ (Kind::BFloat16 | Kind::Half) if fp8.device() != Device::Cpu => k,
                    _ => Kind::Float,
                };
                x2.to_kind(kind).linear::<Tensor>(&fp8.to_dense(kind), None).to_kind(x.kind())
            }
        }
    };
    if shape.len() == 2 {
        y
    } else {
        let mut out = shape.clone();
        *out.last_mut().expect("non-scalar") = y.size()[1];
        y.reshape(out)
    }
}
