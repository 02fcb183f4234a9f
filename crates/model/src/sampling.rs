//! Token selection on the last stage, so that logits never leave it.
//!
//! Order per row: penalties on the raw logits, then greedy argmax, or temperature, top-k, min-p and
//! top-p filtering and a draw from the request's own random stream (ChaCha8 seeded by the request
//! seed and the number of tokens generated so far, so a result does not depend on which other
//! requests share the batch). Log-probabilities are those of the model's raw distribution.

use std::collections::HashMap;

use mlaserve_core::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::error::{input_err, Result};

/// What one sequence needs sampled this step.
pub struct SampleRow<'a> {
    pub params: &'a SamplingParams,
    /// Prompt tokens (for the repetition penalty; may be empty when no penalty is set).
    pub prompt: &'a [u32],
    /// Tokens generated so far (for penalties; may be empty when no penalty is set).
    pub output: &'a [u32],
    /// How many tokens were generated so far: the position in the request's random stream.
    pub generated: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampleOutput {
    pub token: u32,
    /// Log-probability of `token` (0 when not requested).
    pub logprob: f32,
    /// Most likely alternatives with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Default)]
pub struct Sampler;

impl Sampler {
    /// Samples one token per row of `logits [B, V]` (fp32).
    pub fn sample(&self, logits: &Tensor, rows: &[SampleRow]) -> Result<Vec<SampleOutput>> {
        let _guard = tch::no_grad_guard();
        let b = logits.size()[0] as usize;
        if b != rows.len() {
            return Err(input_err(format!("{} rows of logits for {} sequences", b, rows.len())));
        }
        let logits = logits.to_device(Device::Cpu).to_kind(Kind::Float);
        let mut out = Vec::with_capacity(b);
        // Greedy rows without penalties are the common case: one argmax over the whole batch.
        let argmax: Vec<i64> = if logits.dim() == 2 && logits.is_contiguous() && logits.size()[1] > 0 {
            let v = logits.size()[1] as usize;
            // SAFETY: a contiguous f32 CPU tensor of b · v values, alive for this call.
            let all = unsafe { std::slice::from_raw_parts(logits.data_ptr() as *const f32, b * v) };
            all.chunks(v).take(b).map(|row| mlaserve_kernels::rows::argmax(row) as i64).collect()
        } else {
            Vec::try_from(logits.argmax(-1, false))?
        };
        for (i, row) in rows.iter().enumerate() {
            let p = row.params;
            if p.is_greedy() && !p.adjusts_logits() && !p.wants_logprobs() {
                // The argmax is the answer: no row tensor (a cold libtorch call or two a step).
                out.push(SampleOutput { token: argmax[i] as u32, logprob: 0.0, top: vec![] });
                continue;
            }
            let raw = logits.get(i as i64);
            let processed = if p.adjusts_logits() {
                apply_logit_bias(&apply_penalties(&raw, p, row.prompt, row.output), p)
            } else {
                raw.shallow_clone()
            };
            let token = if p.is_greedy() {
                if p.adjusts_logits() {
                    processed.argmax(-1, false).int64_value(&[]) as u32
                } else {
                    argmax[i] as u32
                }
            } else {
                draw(&processed, p, row.generated)
            };
            let (logprob, top) = logprob_info(&raw, token, p)?;
            out.push(SampleOutput { token, logprob, top });
        }
        Ok(out)
    }
}

/// Log-probability of `token` under the raw distribution `raw [V]` and the most likely
/// alternatives, as far as `p` asks for them (zero and none otherwise).
pub fn logprob_info(raw: &Tensor, token: u32, p: &SamplingParams) -> Result<(f32, Vec<(u32, f32)>)> {
    if !p.wants_logprobs() {
        return Ok((0.0, vec![]));
    }
    let lp = raw.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let chosen = lp.double_value(&[token as i64]) as f32;
    let top = if p.top_logprobs > 0 {
        let (v, ix) = lp.topk(p.top_logprobs as i64, -1, true, true);
        let v: Vec<f32> = Vec::try_from(v)?;
        let ix: Vec<i64> = Vec::try_from(ix)?;
        ix.into_iter().map(|t| t as u32).zip(v).collect()
    } else {
        vec![]
    };
    Ok((chosen, top))
}

/// Adds the request's logit bias (ids checked against the vocabulary by the router).
fn apply_logit_bias(logits: &Tensor, p: &SamplingParams) -> Tensor {
    if p.logit_bias.is_empty() {
        return logits.shallow_clone();
    }
    let mut out = logits.copy();
    let (ids, bias): (Vec<i64>, Vec<f32>) = p.logit_bias.iter().map(|&(t, b)| (t as i64, b)).unzip();
    let ids = Tensor::from_slice(&ids);
    let v = out.index_select(0, &ids) + Tensor::from_slice(&bias);
    let _ = out.index_copy_(0, &ids, &v);
    out
}

fn apply_penalties(raw: &Tensor, p: &SamplingParams, prompt: &[u32], output: &[u32]) -> Tensor {
    let mut logits = raw.copy();
    if p.repetition_penalty != 1.0 {
        let mut seen: Vec<i64> = prompt.iter().chain(output).map(|&t| t as i64).collect();
        seen.sort_unstable();
        seen.dedup();
        if !seen.is_empty() {
            let ids = Tensor::from_slice(&seen);
            let v = logits.index_select(0, &ids);
            let r = p.repetition_penalty as f64;
            let v = (&v / r).where_self(&v.gt(0.0), &(&v * r));
            let _ = logits.index_copy_(0, &ids, &v);
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        if !counts.is_empty() {
            let (ids, sub): (Vec<i64>, Vec<f32>) = counts
                .into_iter()
                .map(|(t, c)| (t as i64, p.frequency_penalty * c as f32 + p.presence_penalty))
                .unzip();
            let ids = Tensor::from_slice(&ids);
            let v = logits.index_select(0, &ids) - Tensor::from_slice(&sub);
            let _ = logits.index_copy_(0, &ids, &v);
        }
    }
    logits
}

/// The tempered distribution of one row, sorted descending, with the original index of each entry
/// and how many leading entries survive top-k, min-p and top-p (applied in that order).
pub(crate) fn filtered(logits: &Tensor, p: &SamplingParams) -> (Tensor, Tensor, i64) {
    let probs = (logits.to_kind(Kind::Float) / p.temperature as f64).softmax(-1, Kind::Float);
    let v = probs.size()[0];
    let (sorted, order) = if p.top_k > 0 && (p.top_k as i64) < v {
        probs.topk(p.top_k as i64, -1, true, true)
    } else {
        probs.sort(-1, true)
    };
    let mut keep = sorted.size()[0];
    if p.min_p > 0.0 {
        let max = sorted.double_value(&[0]);
        keep = keep.min(sorted.ge(max * p.min_p as f64).sum(Kind::Int64).int64_value(&[]).max(1));
    }
    if p.top_p < 1.0 {
        // Smallest prefix whose mass reaches top_p (relative to what the earlier filters kept).
        let kept = sorted.narrow(0, 0, keep);
        let cum = kept.cumsum(0, Kind::Float) / kept.sum(Kind::Float);
        let below = cum.lt(p.top_p as f64).sum(Kind::Int64).int64_value(&[]);
        keep = keep.min(below + 1);
    }
    (sorted, order, keep)
}

/// Draws from the filtered, tempered distribution of one row.
fn draw(logits: &Tensor, p: &SamplingParams, step: u64) -> u32 {
    let (sorted, order, keep) = filtered(logits, p);
    let mass: Vec<f32> = Vec::try_from(sorted.narrow(0, 0, keep)).expect("f32 probabilities");
    let total: f32 = mass.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let u: f32 = rng.random::<f32>() * total;
    let mut acc = 0.0f32;
    let mut pick = keep - 1;
    for (i, m) in mass.iter().enumerate() {
        acc += m;
        if u < acc {
            pick = i as i64;
            break;
        }
    }
    order.int64_value(&[pick]) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).unsqueeze(0)
    }

    fn sample_one(l: &Tensor, p: &SamplingParams, output: &[u32]) -> SampleOutput {
        Sampler
            .sample(l, &[SampleRow { params: p, prompt: &[], output, generated: output.len() as u64 }])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn greedy_and_logprobs() {
        let l = logits(&[1.0, 3.0, 2.0]);
        let p = SamplingParams { top_logprobs: 2, ..Default::default() };
        let o = sample_one(&l, &p, &[]);
        assert_eq!(o.token, 1);
        let z = (1f32.exp() + 3f32.exp() + 2f32.exp()).ln();
        assert!((o.logprob - (3.0 - z)).abs() < 1e-5);
        assert_eq!(o.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let l = logits(&[2.0, 2.5, -1.0]);
        let rep = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        assert_eq!(sample_one(&l, &rep, &[1]).token, 0);
        let freq = SamplingParams { frequency_penalty: 0.3, ..Default::default() };
        assert_eq!(sample_one(&l, &freq, &[1]).token, 1, "one occurrence: 2.2 > 2.0");
        assert_eq!(sample_one(&l, &freq, &[1, 1]).token, 0, "two occurrences: 1.9 < 2.0");
    }

    #[test]
    fn seeded_draws_repeat_and_filters_hold() {
        let l = Tensor::randn([1, 50], (Kind::Float, Device::Cpu));
        let p = SamplingParams { temperature: 1.0, seed: 7, ..Default::default() };
        let a: Vec<u32> = (0..20).map(|s| sample_one(&l, &p, &vec![0; s]).token).collect();
        let b: Vec<u32> = (0..20).map(|s| sample_one(&l, &p, &vec![0; s]).token).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1, "draws vary with the step");
        let top1 = SamplingParams { temperature: 1.0, top_k: 1, seed: 3, ..Default::default() };
        let best = l.argmax(-1, false).int64_value(&[0]) as u32;
        assert!((0..10).all(|s| sample_one(&l, &top1, &vec![0; s]).token == best));
        let tiny_p = SamplingParams { temperature: 1.0, top_p: 1e-6, seed: 3, ..Default::default() };
        assert!((0..10).all(|s| sample_one(&l, &tiny_p, &vec![0; s]).token == best));
        let min_p = SamplingParams { temperature: 1.0, min_p: 1.0, seed: 3, ..Default::default() };
        assert!((0..10).all(|s| sample_one(&l, &min_p, &vec![0; s]).token == best));
    }

    /// Sampling at temperature 1 follows the softmax distribution (loose chi-square style bound).
    #[test]
    fn draws_follow_the_distribution() {
        let l = logits(&[0.0, 1.0, 2.0]);
        let probs: Vec<f32> = Vec::try_from(l.softmax(-1, Kind::Float).squeeze_dim(0)).unwrap();
        let mut counts = [0usize; 3];
        let n = 3000;
        for s in 0..n {
            let p = SamplingParams { temperature: 1.0, seed: 11, ..Default::default() };
            counts[sample_one(&l, &p, &vec![0; s]).token as usize] += 1;
        }
        for k in 0..3 {
            let f = counts[k] as f32 / n as f32;
            assert!((f - probs[k]).abs() < 0.03, "token {k}: {f} vs {}", probs[k]);
        }
    }
}
