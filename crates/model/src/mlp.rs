use tch::Tensor;

use crate::linear::Linear;

/// SwiGLU MLP `down(silu(gate x) * up x)` with gate and up fused into one `[2I, H]` matrix.
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    inter: i64,
}

impl Mlp {
    pub fn new(gate: Tensor, up: Tensor, down: Tensor) -> Self {
        let inter = gate.size()[0];
        Mlp { gate_up: Linear::new(Tensor::cat(&[gate, up], 0)), down: Linear::new(down), inter }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gu = self.gate_up.forward(x);
        let act = gu.narrow(-1, 0, self.inter).silu() * gu.narrow(-1, self.inter, self.inter);
        self.down.forward(&act)
    }
}
