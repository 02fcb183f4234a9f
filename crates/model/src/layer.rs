use tch::{Kind, Tensor};

use crate::attention::Mla;
use crate::batch::StepPlan;
use crate::error::Result;
use crate::host_step::{self, HostAct};
use crate::linear::Weight;
use crate::loader::LoadCtx;
use crate::mlp::Mlp;
use crate::moe::Moe;
use crate::norm::RmsNorm;
use crate::profile;

pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// `x + MLA(norm(x))`, then `+ FFN(norm(.))`, the FFN dense for the first layers and MoE after.
pub struct DecoderLayer {
    pub index: usize,
    input_norm: RmsNorm,
    attn: Mla,
    post_norm: RmsNorm,
    ffn: Ffn,
    /// What the next layer (or lm_head) reads first: prefetched during this layer's last
    /// product's tail and the glue after it (see [`crate::kernels::prefetch`]).
    then: Vec<Weight>,
}

impl DecoderLayer {
    pub(crate) fn load(ctx: &LoadCtx, index: usize, moe: bool) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let c = ctx.config;
        let ffn = if moe {
            Ffn::Moe(Moe::load(ctx, &format!("{p}.mlp"))?)
        } else {
            let (h, i) = (c.hidden_size, c.intermediate_size);
            Ffn::Dense(Mlp::new(
                ctx.matrix(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
                ctx.matrix(&format!("{p}.mlp.up_proj.weight"), &[i, h])?,
                ctx.matrix(&format!("{p}.mlp.down_proj.weight"), &[h, i])?,
            ))
        };
        let mut layer = DecoderLayer {
            index,
            input_norm: ctx.norm(&format!("{p}.input_layernorm.weight"), c.hidden_size)?,
            attn: Mla::load(ctx, &format!("{p}.self_attn"))?,
            post_norm: ctx.norm(&format!("{p}.post_attention_layernorm.weight"), c.hidden_size)?,
            ffn,
            then: Vec::new(),
        };
        layer.pack();
        Ok(layer)
    }

    /// Moves its CPU weights into one huge-page allocation in read order (see `huge_pages`): one
    /// layer at a time, so loading holds at most one layer twice.
    fn pack(&mut self) {
        let mut ts = self.attn.tensors_mut();
        match &mut self.ffn {
            Ffn::Dense(m) => ts.extend(m.tensors_mut()),
            Ffn::Moe(m) => ts.extend(m.tensors_mut()),
        }
        crate::huge_pages::pack(ts);
        if let Ffn::Moe(m) = &mut self.ffn {
            m.refresh_views();
        }
    }

    /// The weights this layer's first product reads (its attention's input projections).
    pub(crate) fn first_weights(&self) -> [&Weight; 2] {
        self.attn.first_weights()
    }

    /// Sets what follows this layer (see `then`).
    pub(crate) fn set_then(&mut self, then: Vec<Weight>) {
        self.then = then;
    }

    pub fn forward(&self, x: &Tensor, plan: &StepPlan, cache: &mut Tensor) -> Tensor {
        let (h, f) = self.forward_split(x, None, plan, cache);
        h + f
    }

    /// The layer on the residual stream `x + pending` (`pending`: the previous layer's FFN output,
    /// not yet added, so that the add joins this layer's input norm). Returns `(h, f)`, the output
    /// being `h + f`, left for the next layer's input norm (or the caller) to add.
    pub(crate) fn forward_split(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        plan: &StepPlan,
        cache: &mut Tensor,
    ) -> (Tensor, Tensor) {
        let (x, n) = match pending {
            Some(f) => self.input_norm.forward_residual(x, f),
            None => (x.shallow_clone(), self.input_norm.forward(x)),
        };
        let a = {
            let _p = profile::section("attention");
            let ffn_first = match &self.ffn {
                Ffn::Dense(m) => m.first_weights(),
                Ffn::Moe(m) => m.first_weights(),
            };
            self.attn.forward_then(&n, plan, cache, &ffn_first)
        };
        let then: Vec<&Weight> = self.then.iter().collect();
        let (h, n) = self.post_norm.forward_residual(&x, &a);
        let f = match &self.ffn {
            Ffn::Dense(m) => {
                let _p = profile::section("dense_mlp");
                m.forward_then(&n, &then)
            }
            Ffn::Moe(m) => {
                let _p = profile::section("moe");
                m.forward_then(&n, &then)
            }
        };
        (h, f)
    }

    /// Whether [`DecoderLayer::forward_host`] takes this layer for activations of `kind`.
    pub(crate) fn host_ready(&self, kind: Kind) -> bool {
        let ffn = match &self.ffn {
            Ffn::Dense(m) => m.host_ready(),
            Ffn::Moe(m) => m.host_ready(),
        };
        ffn && self.attn.host_ready(kind)
            && [&self.input_norm, &self.post_norm].iter().all(|n| n.weight().kind() == kind)
    }

    /// [`DecoderLayer::forward_split`] on host rows (`x [T, H]`, `pending` the previous layer's FFN
    /// output) of a step that fits the host form, for a layer that is [`DecoderLayer::host_ready`].
    pub(crate) fn forward_host<T: HostAct>(
        &self,
        x: Vec<T>,
        pending: Option<&[T]>,
        plan: &StepPlan,
        cache: &mut Tensor,
        hidden: usize,
    ) -> (Vec<T>, Vec<T>) {
        fn norm(n: &RmsNorm) -> (&Tensor, f64) {
            (n.weight(), n.eps())
        }
        let (x, n) = match pending {
            Some(f) => host_step::add_rms_norm(&x, f, norm(&self.input_norm)),
            None => {
                let n = host_step::rms_norm(&x, norm(&self.input_norm));
                (x, n)
            }
        };
        let a = {
            let _p = profile::section("attention");
            let ffn_first = match &self.ffn {
                Ffn::Dense(m) => m.first_weights(),
                Ffn::Moe(m) => m.first_weights(),
            };
            self.attn.forward_host(&n, plan, cache, &ffn_first)
        };
        let then: Vec<&Weight> = self.then.iter().collect();
        let (h, n) = host_step::add_rms_norm(&x, &a, norm(&self.post_norm));
        let f = match &self.ffn {
            Ffn::Dense(m) => {
                let _p = profile::section("dense_mlp");
                m.forward_host(&n, &then)
            }
            Ffn::Moe(m) => {
                let _p = profile::section("moe");
                m.forward_host(&n, hidden, &then)
            }
        };
        (h, f)
    }

    pub fn moe(&self) -> Option<&Moe> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }
}
