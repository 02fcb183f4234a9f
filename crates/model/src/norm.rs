use tch::{Kind, Tensor};

/// RMSNorm with statistics in fp32 and the weight applied in the activation dtype (transformers' order).
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn eps(&self) -> f64 {
        self.eps
    }

    /// `(x + a, forward(x + a))`: the residual add before a norm, fused on the CPU.
    pub fn forward_residual(&self, x: &Tensor, a: &Tensor) -> (Tensor, Tensor) {
        if let Some(pair) = crate::kernels::add_rms_norm(x, a, &self.weight, self.eps) {
            return pair;
        }
        let h = x + a;
        let n = self.forward(&h);
        (h, n)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(y) = crate::kernels::rms_norm(x, &self.weight, self.eps) {
            return y;
        }
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        (xf * (var + self.eps).rsqrt()).to_kind(kind) * &self.weight
    }
}
