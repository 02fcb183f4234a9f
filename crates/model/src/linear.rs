use tch::{Device, Kind, Tensor};

use crate::kernels;

/// A bias-free linear layer `y = x W^T` with `W` stored `[out, in]` as in the checkpoint.
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        forward_weight(x, &self.weight)
    }
}

/// `x · wᵀ`: on the CPU through [`kernels`]; without AVX2, bf16 weights multiply as f32 (libtorch's
/// CPU bf16 GEMM is several times slower); elsewhere libtorch.
pub fn forward_weight(x: &Tensor, w: &Tensor) -> Tensor {
    if kernels::use_for(x, w) {
        return kernels::linear(x, w);
    }
    if w.kind() == Kind::BFloat16 && w.device() == Device::Cpu {
        return x.to_kind(Kind::Float).linear::<Tensor>(&w.to_kind(Kind::Float), None).to_kind(x.kind());
    }
    x.linear::<Tensor>(w, None)
}
