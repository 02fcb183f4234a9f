//! Speculative decoding with the MTP module as the draft model: one draft token per step, verified in
//! the same forward as the next token.
//!
//! Greedy requests accept the draft when it equals the target's argmax, so their output is exactly
//! the output without speculation. Sampled requests use the standard acceptance rule: accept draft
//! `d` (drawn from the draft distribution q) with probability min(1, p(d)/q(d)), otherwise draw from
//! the normalised residual max(p − q, 0); both distributions are the request's processed ones
//! (temperature, top-k, min-p, top-p), so accepted output follows p exactly.

use mlaserve_core::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// A drafted token and, for sampled requests, the distribution it was drawn from.
pub struct Draft {
    pub token: u32,
    pub probs: Option<Tensor>,
}

/// Streams of the per-request generator used here, apart from the ordinary sampling stream.
#[derive(Clone, Copy)]
enum Purpose {
    Draft = 1,
    Accept = 2,
    Residual = 3,
}

fn uniform(p: &SamplingParams, generated: u64, purpose: Purpose) -> f64 {
    let key = generated.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((purpose as u64) << 56) ^ 0x5EC0_DE00;
    ChaCha8Rng::seed_from_u64(p.seed ^ key).random::<f64>()
}

/// The request's sampling distribution over the whole vocabulary: logits / temperature, softmax,
/// then top-k, min-p and top-p filtering, renormalised.
pub fn processed_probs(logits: &Tensor, p: &SamplingParams) -> Tensor {
    let (sorted, order, keep) = crate::sampling::filtered(logits, p);
    let kept = sorted.narrow(0, 0, keep);
    let kept = &kept / kept.sum(Kind::Float);
    Tensor::zeros([logits.size()[0]], (Kind::Float, logits.device())).index_copy(
        0,
        &order.narrow(0, 0, keep),
        &kept,
    )
}

/// Inverse-CDF draw from a dense distribution: the first index whose cumulative mass exceeds
/// `u` × total, which always has positive probability.
fn draw_dense(probs: &Tensor, u: f64) -> u32 {
    let cdf = probs.to_kind(Kind::Double).cumsum(0, Kind::Double);
    let total = cdf.double_value(&[-1]);
    let idx = cdf.le(u * total).sum(Kind::Int64).int64_value(&[]);
    idx.min(probs.size()[0] - 1) as u32
}

/// Drafts the next token from MTP logits `[V]`; `generated` is the draft's index in the output.
pub fn draft(logits: &Tensor, p: &SamplingParams, generated: u64) -> Draft {
    if p.is_greedy() {
        return Draft { token: logits.argmax(-1, false).int64_value(&[]) as u32, probs: None };
    }
    let q = processed_probs(logits, p);
    Draft { token: draw_dense(&q, uniform(p, generated, Purpose::Draft)), probs: Some(q) }
}

/// Verifies `draft` against the target logits at its position (`target`, the distribution of the
/// next token) and, when accepted, draws the bonus token from `bonus` (the logits after the
/// draft). Returns the emitted tokens: one (draft rejected) or two.
pub fn verify(target: &Tensor, bonus: &Tensor, d: &Draft, p: &SamplingParams, generated: u64) -> Vec<u32> {
    if p.is_greedy() {
        let t = target.argmax(-1, false).int64_value(&[]) as u32;
        if t != d.token {
            return vec![t];
        }
        return vec![t, bonus.argmax(-1, false).int64_value(&[]) as u32];
    }
    let pt = processed_probs(target, p);
    let q = d.probs.as_ref().expect("sampled drafts carry their distribution");
    let (pd, qd) = (pt.double_value(&[d.token as i64]), q.double_value(&[d.token as i64]));
    let accept = qd > 0.0 && uniform(p, generated, Purpose::Accept) < (pd / qd).min(1.0);
    if accept {
        let pb = processed_probs(bonus, p);
        return vec![d.token, draw_dense(&pb, uniform(p, generated + 1, Purpose::Accept))];
    }
    let residual = (&pt - q).clamp_min(0.0);
    let residual = if residual.sum(Kind::Double).double_value(&[]) > 0.0 { residual } else { pt };
    vec![draw_dense(&residual, uniform(p, generated, Purpose::Residual))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, seed: 9, ..Default::default() }
    }

    #[test]
    fn greedy_accepts_exactly_the_argmax() {
        let target = Tensor::from_slice(&[0.1f32, 3.0, 0.2]);
        let bonus = Tensor::from_slice(&[5.0f32, 0.0, 0.0]);
        let p = params(0.0);
        assert_eq!(verify(&target, &bonus, &Draft { token: 1, probs: None }, &p, 0), vec![1, 0]);
        assert_eq!(verify(&target, &bonus, &Draft { token: 2, probs: None }, &p, 0), vec![1]);
    }

    #[test]
    fn processed_probs_filter_and_renormalise() {
        let l = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let p = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() };
        let v: Vec<f32> = Vec::try_from(processed_probs(&l, &p)).unwrap();
        assert_eq!((v[0], v[1]), (0.0, 0.0));
        assert!((v[2] + v[3] - 1.0).abs() < 1e-6 && v[3] > v[2]);
    }

    /// The first emitted token follows the target distribution p whatever the draft distribution q
    /// (the point of the acceptance rule), checked over many seeds.
    #[test]
    fn sampled_verification_preserves_the_target_distribution() {
        let target = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 0.5]);
        let draft_logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0]); // quite different from p
        let bonus = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let pt: Vec<f32> = Vec::try_from(target.softmax(-1, Kind::Float)).unwrap();
        let mut counts = [0usize; 4];
        let n = 4000;
        for s in 0..n {
            let p = SamplingParams { temperature: 1.0, seed: s as u64, ..Default::default() };
            let d = draft(&draft_logits, &p, 0);
            counts[verify(&target, &bonus, &d, &p, 0)[0] as usize] += 1;
        }
        for k in 0..4 {
            let f = counts[k] as f32 / n as f32;
            assert!((f - pt[k]).abs() < 0.03, "token {k}: {f} vs {}", pt[k]);
        }
    }
}
