//! RoPE as configured: how the rotary dimensions are paired, the YaRN scaling parameters (from
//! `rope_scaling`, or transformers 5's `rope_parameters`), and what follows from them: the inverse
//! frequencies, the cos/sin multiplier and the attention softmax scale.

use serde_json::Value;

use crate::model_config::{invalid, ConfigError, ModelConfig};

/// How the 64 rotary dimensions of q_pe / k_pe are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Consecutive pairs (x[2i], x[2i+1]): what DeepSeek checkpoints were trained with.
    Interleaved,
    /// Pairs (x[i], x[i + d/2]) (`rope_interleave: false`), for checkpoints whose rows were permuted offline.
    Half,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

impl ModelConfig {
    /// Attention softmax scale: head_dim^-1/2, times the YaRN temperature mscale(factor, mscale_all_dim)^2
    /// (transformers' rule: applied whenever YaRN is on and mscale_all_dim is non-zero).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            RopeScaling::Yarn { factor, mscale_all_dim: Some(m), .. } if *m != 0.0 => {
                let s = yarn_mscale(*factor, *m);
                base * s * s
            }
            _ => base,
        }
    }

    /// Multiplier YaRN applies to cos/sin (1.0 for DeepSeek-V3).
    pub fn rope_attention_factor(&self) -> f64 {
        match &self.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Yarn { factor, mscale, mscale_all_dim, attention_factor, .. } => {
                if let Some(a) = attention_factor {
                    return *a;
                }
                match (mscale, mscale_all_dim) {
                    (Some(a), Some(b)) if *a != 0.0 && *b != 0.0 => {
                        yarn_mscale(*factor, *a) / yarn_mscale(*factor, *b)
                    }
                    _ => yarn_mscale(*factor, 1.0),
                }
            }
        }
    }

    /// Rotary inverse frequencies (qk_rope_head_dim / 2 values), YaRN-blended when configured.
    /// Computed in f32 like the reference so that angles agree bit for bit at large positions.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.qk_rope_head_dim;
        let half = dim / 2;
        let base = self.rope_theta;
        let pos_freqs: Vec<f32> =
            (0..half).map(|i| (base as f32).powf((2 * i) as f32 / dim as f32)).collect();
        match &self.rope_scaling {
            RopeScaling::None => pos_freqs.iter().map(|p| 1.0 / p).collect(),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let corr = |rot: f64| {
                    dim as f64
                        * ((*original_max_position_embeddings as f64) / (rot * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min((dim - 1) as f64);
                if low == high {
                    high += 0.001;
                }
                (0..half)
                    .map(|i| {
                        let ramp = (((i as f32) - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrap_factor = 1.0 - ramp;
                        let extrap = 1.0 / pos_freqs[i];
                        let interp = 1.0 / (*factor as f32 * pos_freqs[i]);
                        interp * (1.0 - extrap_factor) + extrap * extrap_factor
                    })
                    .collect()
            }
        }
    }
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn num(v: &Value, field: &'static str) -> Result<Option<f64>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_f64()),
        _ => Err(invalid(field, "must be a number")),
    }
}

pub(crate) fn parse_rope(
    rope_theta: Option<f64>,
    rope_scaling: Option<&Value>,
    rope_parameters: Option<&Value>,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling), ConfigError> {
    // transformers 5 folds theta and the scaling into `rope_parameters`; the hub configs keep them apart.
    let params = match (rope_scaling, rope_parameters) {
        (Some(Value::Null) | None, Some(p)) if !p.is_null() => Some(p),
        (Some(s), _) if !s.is_null() => Some(s),
        _ => None,
    };
    let field = if rope_parameters.is_some_and(|p| !p.is_null()) && rope_scaling.is_none_or(|s| s.is_null()) {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let get = |key: &str| params.and_then(|p| p.get(key)).unwrap_or(&Value::Null);
    let theta = match rope_theta {
        Some(t) => t,
        None => num(get("rope_theta"), "rope_theta")?.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(invalid("rope_theta", "must be > 1"));
    }
    let Some(p) = params else {
        return Ok((theta, RopeScaling::None));
    };
    if !p.is_object() {
        return Err(invalid(field, "must be an object"));
    }
    let kind = get("rope_type").as_str().or_else(|| get("type").as_str()).unwrap_or("default");
    match kind {
        "default" => Ok((theta, RopeScaling::None)),
        "yarn" => {
            let original = num(get("original_max_position_embeddings"), field)?
                .map(|v| v as usize)
                .unwrap_or(max_position_embeddings);
            let factor = match num(get("factor"), field)? {
                Some(f) => f,
                None => max_position_embeddings as f64 / original as f64,
            };
            if !(factor.is_finite() && factor > 0.0) {
                return Err(invalid(field, "factor must be positive"));
            }
            if original == 0 {
                return Err(invalid(field, "original_max_position_embeddings must be positive"));
            }
            // transformers treats 0 / missing beta as the paper defaults (32, 1).
            let beta_fast = num(get("beta_fast"), field)?.filter(|b| *b != 0.0).unwrap_or(32.0);
            let beta_slow = num(get("beta_slow"), field)?.filter(|b| *b != 0.0).unwrap_or(1.0);
            Ok((
                theta,
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast,
                    beta_slow,
                    mscale: num(get("mscale"), field)?,
                    mscale_all_dim: num(get("mscale_all_dim"), field)?,
                    attention_factor: num(get("attention_factor"), field)?,
                    truncate: get("truncate").as_bool().unwrap_or(true),
                },
            ))
        }
        other => Err(invalid(
            field,
            format!("type {other:?} is not supported (DeepSeek-V3 uses \"yarn\" or none)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_configs::V3;

    #[test]
    fn deepseek_v3_softmax_scale_and_attention_factor() {
        let c = ModelConfig::from_json_str(V3).unwrap();
        // Figures from the model notes: softmax scale 0.13523378 and attention factor exactly 1.
        assert!((c.softmax_scale() - 0.135_233_78).abs() < 1e-8, "{}", c.softmax_scale());
        assert_eq!(c.rope_attention_factor(), 1.0);
        assert_eq!(c.rope_layout, RopeLayout::Interleaved);
    }

    #[test]
    fn yarn_frequencies_match_reference_table() {
        let c = ModelConfig::from_json_str(V3).unwrap();
        let f = c.rope_inv_freq();
        let expected = [
            (0usize, 1.0f32),
            (1, 0.749894),
            (10, 0.0562341),
            (11, 0.0390069),
            (16, 0.0055),
            (21, 0.00041499),
            (22, 0.000177828),
            (23, 3.3338e-05),
            (31, 3.3338e-06),
        ];
        for (i, v) in expected {
            assert!((f[i] - v).abs() / v < 1e-4, "inv_freq[{i}] = {} want {v}", f[i]);
        }
    }

    #[test]
    fn transformers5_rope_parameters_layout() {
        let text = V3.replace(
            r#""rope_theta": 10000,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},"#,
            r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},"#,
        );
        assert_ne!(text, V3);
        let a = ModelConfig::from_json_str(V3).unwrap();
        let b = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!(a.rope_theta, b.rope_theta);
    }

    #[test]
    fn q_lora_null_and_no_rope_scaling() {
        let text = V3
            .replace(r#""q_lora_rank": 1536"#, r#""q_lora_rank": null"#)
            .replace(r#""type": "yarn""#, r#""type": "default""#);
        let c = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!((c.softmax_scale() - 192f64.powf(-0.5)).abs() < 1e-12);
        assert!((c.rope_inv_freq()[1] - 10000f32.powf(-2.0 / 64.0)).abs() < 1e-7);
    }
}
