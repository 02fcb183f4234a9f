//! Conversions between the shared Rust types and their wire messages, each beside its inverse.

use mlaserve_core::SamplingParams;

use crate::internal::v1::SamplingSettings;

impl From<&SamplingParams> for SamplingSettings {
    fn from(p: &SamplingParams) -> Self {
        SamplingSettings {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed: p.seed,
            logprobs: p.logprobs,
            top_logprobs: p.top_logprobs,
            logit_bias: p.logit_bias.iter().copied().collect(),
        }
    }
}

impl From<&SamplingSettings> for SamplingParams {
    fn from(s: &SamplingSettings) -> Self {
        SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            seed: s.seed,
            logprobs: s.logprobs,
            top_logprobs: s.top_logprobs,
            logit_bias: {
                let mut b: Vec<(u32, f32)> = s.logit_bias.iter().map(|(&t, &v)| (t, v)).collect();
                b.sort_unstable_by_key(|x| x.0);
                b
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_round_trips() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            frequency_penalty: 0.2,
            presence_penalty: 0.3,
            seed: 42,
            logprobs: true,
            top_logprobs: 3,
            logit_bias: vec![(3, -1.5), (9, 100.0)],
        };
        assert_eq!(SamplingParams::from(&SamplingSettings::from(&p)), p);
        let d = SamplingParams::default();
        assert_eq!(SamplingParams::from(&SamplingSettings::from(&d)), d);
    }
}
