//! Per-request sampling parameters, shared by the router (which validates them) and the last
//! pipeline stage (which samples). Defaults mean "off": greedy decoding of the raw distribution.

use serde::{Deserialize, Serialize};

/// Most alternatives per token a request may ask log-probabilities for.
pub const MAX_TOP_LOGPROBS: u32 = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches top_p; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 = off.
    pub min_p: f32,
    /// Divides positive / multiplies negative logits of tokens seen in prompt or output; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the output so far; 0 = off.
    pub frequency_penalty: f32,
    /// Subtracted once if a token occurs in the output so far; 0 = off.
    pub presence_penalty: f32,
    /// Seed of this request's random stream; the same seed and inputs give the same tokens.
    pub seed: u64,
    /// Return the log-probability of each chosen token.
    pub logprobs: bool,
    /// Also return this many most likely alternatives per position.
    pub top_logprobs: u32,
    /// Added to these tokens' logits before sampling (sorted by token id).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            logprobs: false,
            top_logprobs: 0,
            logit_bias: vec![],
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// The one rule, for router and stages alike, of whether a request may decode speculatively:
    /// penalties depend on every token before the one sampled, which a draft's verification in the
    /// same forward pass does not have.
    pub fn may_speculate(&self) -> bool {
        !self.has_penalties() && self.logit_bias.is_empty()
    }

    /// The raw logits are changed before sampling (penalties or a logit bias).
    pub fn adjusts_logits(&self) -> bool {
        self.has_penalties() || !self.logit_bias.is_empty()
    }

    pub fn wants_logprobs(&self) -> bool {
        self.logprobs || self.top_logprobs > 0
    }

    /// Checks every field; the error names the field (without prefix) and the allowed range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err((name, format!("must be a finite number, got {v}")))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(("temperature", format!("must be in [0, 100], got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err((
                "repetition_penalty",
                format!("must be in (0, 10], got {}", self.repetition_penalty),
            ));
        }
        if let Some(&(t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(("logit_bias", format!("for token {t} must be in [-100, 100], got {b}")));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(("frequency_penalty", format!("must be in [-2, 2], got {}", self.frequency_penalty)));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(("presence_penalty", format!("must be in [-2, 2], got {}", self.presence_penalty)));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err((
                "top_logprobs",
                format!("must be at most {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_greedy() {
        let p = SamplingParams::default();
        assert!(p.validate().is_ok());
        assert!(p.is_greedy() && !p.has_penalties() && !p.wants_logprobs());
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { frequency_penalty: 3.0, ..Default::default() }, "frequency_penalty"),
            (SamplingParams { presence_penalty: -3.0, ..Default::default() }, "presence_penalty"),
            (SamplingParams { top_logprobs: 21, ..Default::default() }, "top_logprobs"),
        ];
        for (p, field) in cases {
            assert_eq!(p.validate().unwrap_err().0, field);
        }
    }
}
