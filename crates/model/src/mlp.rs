use tch::Tensor;

use crate::host_step::{self, HostAct};
use crate::kernels;
use crate::linear::{Linear, Weight};

/// SwiGLU MLP `down(silu(gate x) * up x)`. Plain weights fuse gate and up into one `[2I, H]`
/// matrix; FP8 keeps them apart (their block scales would not line up in one matrix when I is
/// not a multiple of the block) and runs both products in one parallel region.
pub struct Mlp {
    up: GateUp,
    down: Linear,
    inter: i64,
}

enum GateUp {
    Fused(Linear),
    Split([Weight; 2]),
}

impl Mlp {
    pub fn new(gate: Weight, up: Weight, down: Weight) -> Self {
        let inter = gate.size()[0];
        let up = match (gate, up) {
            (Weight::Dense(g), Weight::Dense(u)) => GateUp::Fused(Linear::new(Tensor::cat(&[g, u], 0))),
            (g, u) => GateUp::Split([g, u]),
        };
        Mlp { up, down: Linear::from_weight(down), inter }
    }

    /// Its weight tensors in the order a step reads them (gate/up, down).
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out = match &mut self.up {
            GateUp::Fused(l) => l.weight_mut().tensors_mut(),
            GateUp::Split([g, u]) => g.tensors_mut().into_iter().chain(u.tensors_mut()).collect(),
        };
        out.extend(self.down.weight_mut().tensors_mut());
        out
    }

    /// Its matrices as one expert of the routed-experts kernel: gate/up (one fused `[2I, H]` or
    /// two), down, and `I`.
    pub(crate) fn as_expert(&self) -> (&[Weight], &Weight, i64) {
        let gu = match &self.up {
            GateUp::Fused(l) => std::slice::from_ref(l.weight()),
            GateUp::Split(w) => &w[..],
        };
        (gu, self.down.weight(), self.inter)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_then(x, &[])
    }

    /// Whether [`Mlp::forward_host`] takes it: gate and up fused, every product on the kernels.
    pub(crate) fn host_ready(&self) -> bool {
        matches!(&self.up, GateUp::Fused(gu) if gu.host_ready()) && self.down.host_ready()
    }

    /// [`Mlp::forward_then`] on host rows `x [T, H]`, for an MLP that is [`Mlp::host_ready`].
    pub(crate) fn forward_host<T: HostAct>(&self, x: &[T], then: &[&Weight]) -> Vec<T> {
        let GateUp::Fused(gu) = &self.up else { unreachable!("host_ready: gate and up fused") };
        kernels::prefetch(&[self.down.weight()]);
        let act = host_step::swiglu(&gu.forward_host(x), self.inter as usize);
        kernels::prefetch(then);
        self.down.forward_host(&act)
    }

    /// gate/up: the weights its first product reads.
    pub(crate) fn first_weights(&self) -> Vec<&Weight> {
        self.as_expert().0.iter().collect()
    }

    /// [`Mlp::forward`], hinting `down` before gate/up and `then` before down (see
    /// [`kernels::prefetch`]).
    pub(crate) fn forward_then(&self, x: &Tensor, then: &[&Weight]) -> Tensor {
        kernels::prefetch(&[self.down.weight()]);
        let act = match &self.up {
            GateUp::Fused(gu) => {
                let gu = gu.forward(x);
                kernels::swiglu(&gu, self.inter as usize).unwrap_or_else(|| {
                    gu.narrow(-1, 0, self.inter).silu() * gu.narrow(-1, self.inter, self.inter)
                })
            }
            GateUp::Split([g, u]) => {
                let (g, u) = if kernels::use_for(x, g) && kernels::use_for(x, u) {
                    let mut gu = kernels::grouped_linear(&[(x, g), (x, u)]);
                    let u = gu.pop().expect("two products");
                    (gu.pop().expect("two products"), u)
                } else {
                    (crate::linear::forward_weight(x, g), crate::linear::forward_weight(x, u))
                };
                g.silu() * u
            }
        };
        kernels::prefetch(then);
        self.down.forward(&act)
    }
}
