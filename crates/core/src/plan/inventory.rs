//! The tensors a pipeline stage holds, as `crates/model` loads them (`model.rs`, `layer.rs`, `moe.rs`,
//! `mtp.rs`): name, shape, the component it belongs to, and whether it sits on the stage's main device
//! (attention, dense MLP, router, shared experts, norms, embeddings, head) or with one routed expert
//! (split over the expert shards).

use std::ops::Range;

use serde::Serialize;

use crate::model_config::ModelConfig;

/// What a weight is for; the plan reports bytes per component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// MLA projections (q_a/q_b or q, kv_a, kv_b, o) of the main layers.
    Attention,
    /// Gate/up/down of the first `first_k_dense_replace` layers.
    DenseMlp,
    /// Routed experts of the main MoE layers.
    RoutedExperts,
    /// Shared experts of the main MoE layers.
    SharedExperts,
    /// Router gate weights and correction biases (kept in fp32 by the loader).
    Router,
    /// RMSNorm weights of the main layers and the final norm.
    Norms,
    /// The token embedding (first stage) and lm_head (last stage).
    EmbedHead,
    /// Everything of the MTP module: its decoder layer (experts included), norms, eh_proj and, on a
    /// stage without the main embedding, its copy of the embedding.
    Mtp,
}

impl Component {
    pub const ALL: [Component; 8] = [
        Component::Attention,
        Component::DenseMlp,
        Component::RoutedExperts,
        Component::SharedExperts,
        Component::Router,
        Component::Norms,
        Component::EmbedHead,
        Component::Mtp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Attention => "attention",
            Component::DenseMlp => "dense_mlp",
            Component::RoutedExperts => "routed_experts",
            Component::SharedExperts => "shared_experts",
            Component::Router => "router",
            Component::Norms => "norms",
            Component::EmbedHead => "embed_head",
            Component::Mtp => "mtp",
        }
    }
}

/// How the DeepSeek-V3 convention stores a tensor (used when the checkpoint's headers are not at hand),
/// and how the loader keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A linear weight: FP8 with block scales when the config has an fp8 `quantization_config`.
    Linear,
    /// Never quantised: embeddings, lm_head, norms, the MTP `eh_proj`.
    Plain,
    /// Router gate weight and `e_score_correction_bias`: kept in fp32 whatever the weight format.
    RouterF32,
}

/// Where a tensor lives within its stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The stage's main device (device 0), next to the latent cache.
    Main,
    /// With routed expert `e` of its layer, on the shard that holds `e`.
    Expert(usize),
}

#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    /// `[out, in]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    pub component: Component,
    pub placement: Placement,
    pub role: Role,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

struct Out<'a> {
    v: &'a mut Vec<TensorSpec>,
    /// Set for the MTP layer: every tensor counts as `Component::Mtp`.
    mtp: bool,
}

impl Out<'_> {
    fn push(
        &mut self,
        name: String,
        shape: &[usize],
        component: Component,
        placement: Placement,
        role: Role,
    ) {
        let component = if self.mtp { Component::Mtp } else { component };
        self.v.push(TensorSpec { name, shape: shape.to_vec(), component, placement, role });
    }

    fn main(&mut self, name: String, shape: &[usize], component: Component, role: Role) {
        self.push(name, shape, component, Placement::Main, role);
    }
}

/// Decoder layer `index` (the MTP layer when `index == num_hidden_layers`), as `DecoderLayer::load`.
fn push_layer(v: &mut Vec<TensorSpec>, c: &ModelConfig, index: usize, moe: bool) {
    let mut o = Out { v, mtp: index == c.num_hidden_layers };
    let p = format!("model.layers.{index}");
    let (h, nh) = (c.hidden_size, c.num_attention_heads);
    let (qk, rkv, dr) = (c.qk_head_dim(), c.kv_lora_rank, c.qk_rope_head_dim);
    let (dn, dv) = (c.qk_nope_head_dim, c.v_head_dim);
    use Component::*;
    use Role::*;
    o.main(format!("{p}.input_layernorm.weight"), &[h], Norms, Plain);
    o.main(format!("{p}.post_attention_layernorm.weight"), &[h], Norms, Plain);
    let a = format!("{p}.self_attn");
    match c.q_lora_rank {
        Some(rq) => {
            o.main(format!("{a}.q_a_proj.weight"), &[rq, h], Attention, Linear);
            o.main(format!("{a}.q_a_layernorm.weight"), &[rq], Norms, Plain);
            o.main(format!("{a}.q_b_proj.weight"), &[nh * qk, rq], Attention, Linear);
        }
        None => o.main(format!("{a}.q_proj.weight"), &[nh * qk, h], Attention, Linear),
    }
    o.main(format!("{a}.kv_a_proj_with_mqa.weight"), &[rkv + dr, h], Attention, Linear);
    o.main(format!("{a}.kv_a_layernorm.weight"), &[rkv], Norms, Plain);
    o.main(format!("{a}.kv_b_proj.weight"), &[nh * (dn + dv), rkv], Attention, Linear);
    o.main(format!("{a}.o_proj.weight"), &[h, nh * dv], Attention, Linear);
    let m = format!("{p}.mlp");
    if !moe {
        let i = c.intermediate_size;
        o.main(format!("{m}.gate_proj.weight"), &[i, h], DenseMlp, Linear);
        o.main(format!("{m}.up_proj.weight"), &[i, h], DenseMlp, Linear);
        o.main(format!("{m}.down_proj.weight"), &[h, i], DenseMlp, Linear);
        return;
    }
    let (e, mi) = (c.n_routed_experts, c.moe_intermediate_size);
    o.main(format!("{m}.gate.weight"), &[e, h], Router, RouterF32);
    o.main(format!("{m}.gate.e_score_correction_bias"), &[e], Router, RouterF32);
    for j in 0..e {
        let x = format!("{m}.experts.{j}");
        for (name, shape) in [("gate_proj", [mi, h]), ("up_proj", [mi, h]), ("down_proj", [h, mi])] {
            o.push(format!("{x}.{name}.weight"), &shape, RoutedExperts, Placement::Expert(j), Linear);
        }
    }
    if c.n_shared_experts > 0 {
        let si = mi * c.n_shared_experts;
        let x = format!("{m}.shared_experts");
        o.main(format!("{x}.gate_proj.weight"), &[si, h], SharedExperts, Linear);
        o.main(format!("{x}.up_proj.weight"), &[si, h], SharedExperts, Linear);
        o.main(format!("{x}.down_proj.weight"), &[h, si], SharedExperts, Linear);
    }
}

/// The MTP module's own tensors besides its decoder layer (`Mtp::load`); `embed_copy` adds the copy of
/// the embedding a stage without the main one loads, `head_copy` the checkpoint's `shared_head.head`
/// (stored, but never loaded: the main lm_head serves).
fn push_mtp_extras(v: &mut Vec<TensorSpec>, c: &ModelConfig, embed_copy: bool, head_copy: bool) {
    let mut o = Out { v, mtp: true };
    let p = format!("model.layers.{}", c.num_hidden_layers);
    let (h, vocab) = (c.hidden_size, c.vocab_size);
    use Component::*;
    use Role::Plain;
    o.main(format!("{p}.enorm.weight"), &[h], Norms, Plain);
    o.main(format!("{p}.hnorm.weight"), &[h], Norms, Plain);
    o.main(format!("{p}.eh_proj.weight"), &[h, 2 * h], Mtp, Plain);
    o.main(format!("{p}.shared_head.norm.weight"), &[h], Norms, Plain);
    if embed_copy {
        o.main(format!("{p}.embed_tokens.weight"), &[vocab, h], EmbedHead, Plain);
    }
    if head_copy {
        o.main(format!("{p}.shared_head.head.weight"), &[vocab, h], EmbedHead, Plain);
    }
}

/// The tensors a stage over `layers` loads (the worker always loads the MTP module on the last stage
/// when the checkpoint has one). `mtp_moe`: whether the MTP layer is a MoE layer (it is in DeepSeek-V3;
/// the loader decides by the presence of its router gate).
pub fn stage_tensors(c: &ModelConfig, layers: Range<usize>, mtp_moe: bool) -> Vec<TensorSpec> {
    let n = c.num_hidden_layers;
    let (first, last) = (layers.start == 0, layers.end == n);
    let (h, vocab) = (c.hidden_size, c.vocab_size);
    let mut v = Vec::new();
    if first {
        v.push(TensorSpec {
            name: "model.embed_tokens.weight".into(),
            shape: vec![vocab, h],
            component: Component::EmbedHead,
            placement: Placement::Main,
            role: Role::Plain,
        });
    }
    for i in layers {
        push_layer(&mut v, c, i, c.is_moe_layer(i));
    }
    if last {
        let mut o = Out { v: &mut v, mtp: false };
        o.main("model.norm.weight".into(), &[h], Component::Norms, Role::Plain);
        // A tied checkpoint without lm_head.weight still gets its own copy of the embedding as the head.
        o.main("lm_head.weight".into(), &[vocab, h], Component::EmbedHead, Role::Plain);
        if c.has_mtp() {
            push_layer(&mut v, c, n, mtp_moe);
            push_mtp_extras(&mut v, c, !first, false);
        }
    }
    v
}

/// Every tensor the checkpoint stores (MTP copies of the embedding and head included): what its
/// parameter count describes.
pub fn checkpoint_tensors(c: &ModelConfig, mtp_moe: bool) -> Vec<TensorSpec> {
    let n = c.num_hidden_layers;
    let mut v = stage_tensors(c, 0..n, mtp_moe);
    if c.has_mtp() {
        v.retain(|t| !t.name.starts_with(&format!("model.layers.{n}.")));
        push_layer(&mut v, c, n, mtp_moe);
        push_mtp_extras(&mut v, c, true, true);
    }
    if c.tie_word_embeddings {
        v.retain(|t| t.name != "lm_head.weight");
    }
    v
}
