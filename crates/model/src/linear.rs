use tch::Tensor;

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
        x.linear::<Tensor>(&self.weight, None)
    }
}
