//! `config.json` of a Hugging Face DeepSeek-V3-format checkpoint: the schema, parsed and checked once.
//!
//! Accepts both the hub layout (`rope_theta` + `rope_scaling`) and the transformers 5 layout
//! (`rope_parameters`); the RoPE fields are read by `rope_scaling.rs`, the memory and stage plan lives
//! in `plan.rs`. Anything the implementation would silently get wrong is rejected with a message
//! naming the field.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::rope_scaling::parse_rope;
pub use crate::rope_scaling::{RopeLayout, RopeScaling};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not valid JSON for a DeepSeek-V3 config: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("config.json: `{field}` {message}")]
    Invalid { field: &'static str, message: String },
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Quantization {
    None,
    /// Block-scaled float8 e4m3 weights with a `weight_scale_inv` per `[block_out, block_in]` tile.
    Fp8 {
        block_out: usize,
        block_in: usize,
    },
}

/// A validated model configuration. Field names follow `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub first_k_dense_replace: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_layout: RopeLayout,
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quantization: Quantization,
    /// `torch_dtype` / `dtype` of the checkpoint's unquantised tensors, as written (e.g. "bfloat16").
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    #[serde(default)]
    first_k_dense_replace: Option<usize>,
    #[serde(default)]
    moe_layer_freq: Option<usize>,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: usize,
    num_experts_per_tok: usize,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(default)]
    routed_scaling_factor: Option<f64>,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    scoring_func: Option<String>,
    #[serde(default)]
    topk_method: Option<String>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    rope_interleave: Option<bool>,
    #[serde(default, alias = "num_mtp_layers")]
    num_nextn_predict_layers: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<Value>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    quantization_config: Option<Value>,
    #[serde(default)]
    torch_dtype: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ConfigError::Json { source, .. } => {
                ConfigError::Json { path: path.display().to_string(), source }
            }
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|source| ConfigError::Json { path: "config.json".into(), source })?;
        Self::from_raw(raw)
    }

    fn from_raw(r: Raw) -> Result<Self, ConfigError> {
        let model_type = r.model_type.unwrap_or_else(|| "deepseek_v3".into());
        if !matches!(model_type.as_str(), "deepseek_v3" | "kimi_k2") {
            return Err(invalid(
                "model_type",
                format!(
                    "is {model_type:?}; only the DeepSeek-V3 architecture (\"deepseek_v3\") is supported"
                ),
            ));
        }
        for (field, v) in [
            ("vocab_size", r.vocab_size),
            ("hidden_size", r.hidden_size),
            ("intermediate_size", r.intermediate_size),
            ("moe_intermediate_size", r.moe_intermediate_size),
            ("num_hidden_layers", r.num_hidden_layers),
            ("num_attention_heads", r.num_attention_heads),
            ("kv_lora_rank", r.kv_lora_rank),
            ("qk_nope_head_dim", r.qk_nope_head_dim),
            ("qk_rope_head_dim", r.qk_rope_head_dim),
            ("v_head_dim", r.v_head_dim),
            ("n_routed_experts", r.n_routed_experts),
            ("num_experts_per_tok", r.num_experts_per_tok),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if !r.qk_rope_head_dim.is_multiple_of(2) {
            return Err(invalid("qk_rope_head_dim", "must be even (rotary pairs)"));
        }
        if r.q_lora_rank == Some(0) {
            return Err(invalid("q_lora_rank", "must be positive or null"));
        }
        if let Some(kv) = r.num_key_value_heads {
            if kv != r.num_attention_heads {
                return Err(invalid(
                    "num_key_value_heads",
                    format!(
                        "is {kv} but must equal num_attention_heads ({}): MLA has no grouped KV heads",
                        r.num_attention_heads
                    ),
                ));
            }
        }
        let first_k_dense_replace = r.first_k_dense_replace.unwrap_or(0);
        if first_k_dense_replace > r.num_hidden_layers {
            return Err(invalid(
                "first_k_dense_replace",
                format!("({first_k_dense_replace}) exceeds num_hidden_layers ({})", r.num_hidden_layers),
            ));
        }
        if let Some(f) = r.moe_layer_freq {
            if f != 1 {
                return Err(invalid("moe_layer_freq", format!("is {f}; only 1 is supported")));
            }
        }
        let n_group = r.n_group.unwrap_or(1);
        let topk_group = r.topk_group.unwrap_or(n_group);
        if n_group == 0 || !r.n_routed_experts.is_multiple_of(n_group) {
            return Err(invalid(
                "n_group",
                format!("({n_group}) must divide n_routed_experts ({})", r.n_routed_experts),
            ));
        }
        let per_group = r.n_routed_experts / n_group;
        if n_group > 1 && per_group < 2 {
            return Err(invalid(
                "n_group",
                "leaves fewer than 2 experts per group (groups are ranked by their top-2 sum)",
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(invalid("topk_group", format!("({topk_group}) must be in 1..={n_group} (n_group)")));
        }
        if r.num_experts_per_tok > topk_group * per_group {
            return Err(invalid(
                "num_experts_per_tok",
                format!(
                    "({}) exceeds the experts in the kept groups ({} x {per_group})",
                    r.num_experts_per_tok, topk_group
                ),
            ));
        }
        if let Some(s) = &r.scoring_func {
            if s != "sigmoid" {
                return Err(invalid(
                    "scoring_func",
                    format!("is {s:?}; the DeepSeek-V3 router is \"sigmoid\""),
                ));
            }
        }
        if let Some(m) = &r.topk_method {
            if m != "noaux_tc" {
                return Err(invalid(
                    "topk_method",
                    format!("is {m:?}; only \"noaux_tc\" (bias-corrected group-limited top-k) is supported"),
                ));
            }
        }
        if let Some(a) = &r.hidden_act {
            if a != "silu" {
                return Err(invalid("hidden_act", format!("is {a:?}; only \"silu\" is supported")));
            }
        }
        if r.attention_bias == Some(true) {
            return Err(invalid("attention_bias", "true is not supported (DeepSeek-V3 has none)"));
        }
        let rms_norm_eps = r.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(invalid("rms_norm_eps", "must be positive"));
        }
        let routed_scaling_factor = r.routed_scaling_factor.unwrap_or(1.0);
        if !(routed_scaling_factor.is_finite() && routed_scaling_factor > 0.0) {
            return Err(invalid("routed_scaling_factor", "must be positive"));
        }
        let max_position_embeddings = r.max_position_embeddings.unwrap_or(4096);
        if max_position_embeddings == 0 {
            return Err(invalid("max_position_embeddings", "must be positive"));
        }

        let (rope_theta, rope_scaling) = parse_rope(
            r.rope_theta,
            r.rope_scaling.as_ref(),
            r.rope_parameters.as_ref(),
            max_position_embeddings,
        )?;
        let rope_layout =
            if r.rope_interleave.unwrap_or(true) { RopeLayout::Interleaved } else { RopeLayout::Half };

        let eos_token_ids = match &r.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![n
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| invalid("eos_token_id", "must be a token id"))?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| invalid("eos_token_id", "must be token ids"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("eos_token_id", "must be an id or a list of ids")),
        };
        for &id in eos_token_ids.iter().chain(r.bos_token_id.iter()) {
            if id as usize >= r.vocab_size {
                return Err(invalid("eos_token_id", format!("{id} is outside the vocabulary")));
            }
        }

        let quantization = parse_quantization(r.quantization_config.as_ref())?;

        Ok(ModelConfig {
            model_type,
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            moe_intermediate_size: r.moe_intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            first_k_dense_replace,
            num_attention_heads: r.num_attention_heads,
            q_lora_rank: r.q_lora_rank,
            kv_lora_rank: r.kv_lora_rank,
            qk_nope_head_dim: r.qk_nope_head_dim,
            qk_rope_head_dim: r.qk_rope_head_dim,
            v_head_dim: r.v_head_dim,
            n_routed_experts: r.n_routed_experts,
            num_experts_per_tok: r.num_experts_per_tok,
            n_shared_experts: r.n_shared_experts.unwrap_or(0),
            n_group,
            topk_group,
            routed_scaling_factor,
            norm_topk_prob: r.norm_topk_prob.unwrap_or(true),
            rms_norm_eps,
            max_position_embeddings,
            rope_theta,
            rope_scaling,
            rope_layout,
            num_nextn_predict_layers: r.num_nextn_predict_layers.unwrap_or(0),
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            bos_token_id: r.bos_token_id,
            eos_token_ids,
            quantization,
            torch_dtype: r.torch_dtype.or(r.dtype),
        })
    }

    /// Width of one query/key head: nope + rope.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: the normalised latent and the rotated shared key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
    }

    /// Whether the checkpoint carries an MTP module (stored as layer `num_hidden_layers`).
    pub fn has_mtp(&self) -> bool {
        self.num_nextn_predict_layers > 0
    }
}

fn parse_quantization(q: Option<&Value>) -> Result<Quantization, ConfigError> {
    let Some(q) = q.filter(|q| !q.is_null()) else {
        return Ok(Quantization::None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "fp8" {
        return Err(invalid(
            "quantization_config",
            format!("quant_method {method:?} is not supported (only block-scaled \"fp8\")"),
        ));
    }
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(invalid("quantization_config", format!("fmt {fmt:?} is not supported (e4m3)")));
        }
    }
    if let Some(s) = q.get("activation_scheme").and_then(Value::as_str) {
        if s != "dynamic" {
            return Err(invalid(
                "quantization_config",
                format!("activation_scheme {s:?} is not supported (dynamic)"),
            ));
        }
    }
    let block = match q.get("weight_block_size") {
        None | Some(Value::Null) => vec![128, 128],
        Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(0) as usize).collect(),
        Some(_) => vec![],
    };
    if block.len() != 2 || block.contains(&0) {
        return Err(invalid("quantization_config", "weight_block_size must be two positive integers"));
    }
    Ok(Quantization::Fp8 { block_out: block[0], block_in: block[1] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_configs::V3;

    #[test]
    fn parses_deepseek_v3() {
        let c = ModelConfig::from_json_str(V3).unwrap();
        assert_eq!(c.latent_dim(), 576);
        assert_eq!(c.qk_head_dim(), 192);
        assert!(c.has_mtp());
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        assert_eq!(c.eos_token_ids, vec![1]);
        assert_eq!(c.quantization, Quantization::Fp8 { block_out: 128, block_in: 128 });
    }

    #[test]
    fn rejects_inconsistent_values_naming_the_field() {
        let cases = [
            (r#""num_key_value_heads": 128"#, r#""num_key_value_heads": 8"#, "num_key_value_heads"),
            (r#""n_group": 8"#, r#""n_group": 7"#, "n_group"),
            (r#""topk_group": 4"#, r#""topk_group": 9"#, "topk_group"),
            (r#""scoring_func": "sigmoid""#, r#""scoring_func": "softmax""#, "scoring_func"),
            (r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#, "hidden_act"),
            (r#""first_k_dense_replace": 3"#, r#""first_k_dense_replace": 62"#, "first_k_dense_replace"),
            (r#""quant_method": "fp8""#, r#""quant_method": "gptq""#, "quantization_config"),
            (r#""type": "yarn""#, r#""type": "longrope""#, "rope_scaling"),
            (r#""num_experts_per_tok": 8"#, r#""num_experts_per_tok": 200"#, "num_experts_per_tok"),
            (r#""eos_token_id": 1"#, r#""eos_token_id": 200000"#, "eos_token_id"),
            (r#""model_type": "deepseek_v3""#, r#""model_type": "llama""#, "model_type"),
        ];
        for (from, to, field) in cases {
            let text = V3.replace(from, to);
            assert_ne!(text, V3, "{from}");
            let err = ModelConfig::from_json_str(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{to}: {err}");
        }
        let err =
            ModelConfig::from_json_str(&V3.replace(r#""hidden_size": 7168,"#, "")).unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }
}
