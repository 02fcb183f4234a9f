//! The multi-token-prediction module (checkpoint layer `num_hidden_layers`): from the final hidden
//! state of token i and the embedding of token i+1 it predicts token i+2, through a full decoder layer
//! with its own latent cache.

use tch::Tensor;

use crate::batch::StepPlan;
use crate::error::Result;
use crate::layer::DecoderLayer;
use crate::linear::Linear;
use crate::loader::LoadCtx;
use crate::norm::RmsNorm;

pub struct Mtp {
    embed: Tensor,
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Linear,
    layer: DecoderLayer,
    head_norm: RmsNorm,
}

impl Mtp {
    pub(crate) fn load(ctx: &LoadCtx, index: usize, main_embed: Option<&Tensor>) -> Result<Self> {
        let c = ctx.config;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let p = format!("model.layers.{index}");
        // The checkpoint stores a copy of the embedding with the MTP layer; a stage that already holds
        // the main one shares it instead of loading the copy.
        let embed = match main_embed {
            Some(e) => e.shallow_clone(),
            None if ctx.ck.contains(&format!("{p}.embed_tokens.weight")) => {
                ctx.weight(&format!("{p}.embed_tokens.weight"), &[v, h])?
            }
            None => ctx.weight("model.embed_tokens.weight", &[v, h])?,
        };
        let moe = ctx.ck.contains(&format!("{p}.mlp.gate.weight"));
        Ok(Mtp {
            embed,
            enorm: ctx.norm(&format!("{p}.enorm.weight"), h)?,
            hnorm: ctx.norm(&format!("{p}.hnorm.weight"), h)?,
            eh_proj: Linear::from_weight(ctx.matrix(&format!("{p}.eh_proj.weight"), &[h, 2 * h])?),
            layer: DecoderLayer::load(ctx, index, moe)?,
            head_norm: ctx.norm(&format!("{p}.shared_head.norm.weight"), h)?,
        })
    }

    /// Normalised MTP hidden states `[n, H]` (feed lm_head for draft logits).
    pub fn forward(&self, h_prev: &Tensor, next_ids: &Tensor, plan: &StepPlan, cache: &mut Tensor) -> Tensor {
        let e = self.enorm.forward(&self.embed.index_select(0, next_ids));
        let g = self.hnorm.forward(&h_prev.to_kind(e.kind()));
        let x = self.eh_proj.forward(&Tensor::cat(&[e, g], 1));
        self.head_norm.forward(&self.layer.forward(&x, plan, cache))
    }
}
