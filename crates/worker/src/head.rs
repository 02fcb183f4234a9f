//! The last stage's work after its layers: final norm and lm_head on the rows that need logits,
//! sampling, verification of drafted tokens, and (for speculative sequences) the MTP module, which
//! keeps its own latent cache filled and drafts the next token.
//!
//! MTP slot i pairs the final hidden state of position i with the token at i + 1 and lives at cache
//! position i (same block table as the main cache). After every step that emits tokens, a
//! speculative sequence's MTP cache covers exactly its verified positions, and the slot of its last
//! verified position yields the draft for the next step.

use mlaserve_model::batch::select_rows;
use mlaserve_model::sampling::{logprob_info, SampleRow};
use mlaserve_model::speculative::{self, Draft};
use mlaserve_model::{profile, LatentCache, Model, Sampler, SeqStep, StepPlan};
use mlaserve_proto::internal::v1::{DraftToken, SampledToken, Step, TopToken};
use tch::Tensor;

use crate::error::StageError;
use crate::registry::{Registry, SeqState};

/// Tokens and drafts produced by a step on the last stage.
pub struct HeadOutput {
    pub tokens: Vec<SampledToken>,
    pub drafts: Vec<DraftToken>,
}

fn sampled_token(seq_id: u64, token: u32, (logprob, top): (f32, Vec<(u32, f32)>)) -> SampledToken {
    SampledToken {
        seq_id,
        token_id: token,
        logprob,
        top: top.into_iter().map(|(token_id, logprob)| TopToken { token_id, logprob }).collect(),
    }
}

/// Samples, verifies and drafts for `step`, whose layers produced `x` (rows in `plan` order).
/// Sequences' `cached` counts already include this step's tokens; rejected drafts are rolled back.
pub fn run(
    model: &Model,
    cache: &mut LatentCache,
    registry: &mut Registry,
    sampler: &Sampler,
    step: &Step,
    plan: &StepPlan,
    x: &Tensor,
) -> Result<HeadOutput, StageError> {
    let mut starts = Vec::with_capacity(step.seqs.len());
    let mut o = 0i64;
    for w in &step.seqs {
        starts.push(o);
        o += w.token_ids.len() as i64;
    }
    let speculative = |id: u64| model.has_mtp() && registry.get(id).is_some_and(|s| s.speculative);
    let any_spec = step.seqs.iter().any(|w| speculative(w.seq_id));
    // Final hidden states: every row when the MTP module needs them, else only the logit rows.
    let h_all = if any_spec { Some(model.final_norm(x)?) } else { None };

    // Logit rows: the last row of each sampled sequence; for a verification, the last two.
    let mut rows = Vec::new();
    for (i, w) in step.seqs.iter().enumerate() {
        if w.sample {
            if w.verify_draft {
                rows.push(plan.last_rows[i] - 1);
            }
            rows.push(plan.last_rows[i]);
        }
    }
    let p_logits = profile::section("head.logits");
    let logits = if rows.is_empty() {
        None
    } else {
        let h = match &h_all {
            Some(h) => select_rows(h, &rows),
            None => model.final_norm(&select_rows(x, &rows))?,
        };
        Some(model.logits(&h)?.to_device(tch::Device::Cpu))
    };

    drop(p_logits);
    let p_verify = profile::section("head.verify");
    // Plain samples in one batch; verifications one by one.
    let mut emitted: Vec<Vec<u32>> = vec![vec![]; step.seqs.len()];
    let mut tokens = Vec::new();
    let mut plain: Vec<(usize, i64)> = Vec::new();
    let mut r = 0i64;
    for (i, w) in step.seqs.iter().enumerate() {
        if !w.sample {
            continue;
        }
        if w.verify_draft {
            let logits = logits.as_ref().expect("rows exist");
            let (target, bonus) = (logits.get(r), logits.get(r + 1));
            r += 2;
            let s = registry.get_mut(w.seq_id).expect("registered");
            let draft = s.draft.take().ok_or_else(|| {
                StageError::failed_precondition(format!("sequence {}: no draft to verify", w.seq_id))
            })?;
            if w.token_ids.last() != Some(&draft.token) {
                return Err(StageError::invalid(format!(
                    "sequence {}: verifying token {:?}, the draft was {}",
                    w.seq_id,
                    w.token_ids.last(),
                    draft.token
                )));
            }
            // This step fed [t_n, draft]; the token being chosen is t_{n+1}.
            let generated = (s.cached - 1).saturating_sub(s.prompt_len) as u64;
            let out = speculative::verify(&target, &bonus, &draft, &s.params, generated);
            if out.len() == 1 {
                s.cached -= 1; // the draft's cache slot is invalid
            }
            s.rollback_allowed = false;
            for (j, &t) in out.iter().enumerate() {
                let raw = if j == 0 { &target } else { &bonus };
                tokens.push(sampled_token(w.seq_id, t, logprob_info(raw, t, &s.params)?));
            }
            emitted[i] = out;
        } else {
            plain.push((i, r));
            r += 1;
        }
    }
    drop(p_verify);
    if !plain.is_empty() {
        let _p = profile::section("head.sample");
        let logits = logits.as_ref().expect("rows exist");
        let idx: Vec<i64> = plain.iter().map(|p| p.1).collect();
        let sel = logits.index_select(0, &Tensor::from_slice(&idx));
        let states: Vec<&SeqState> =
            plain.iter().map(|&(i, _)| registry.get(step.seqs[i].seq_id).expect("registered")).collect();
        let sample_rows: Vec<SampleRow> = states
            .iter()
            .map(|s| {
                let split = s.prompt_len.min(s.history.len());
                SampleRow {
                    params: &s.params,
                    prompt: &s.history[..split],
                    output: &s.history[split..],
                    generated: s.cached.saturating_sub(s.prompt_len) as u64,
                }
            })
            .collect();
        for (&(i, _), out) in plain.iter().zip(sampler.sample(&sel, &sample_rows)?) {
            tokens.push(SampledToken {
                seq_id: step.seqs[i].seq_id,
                token_id: out.token,
                logprob: out.logprob,
                top: out.top.into_iter().map(|(token_id, logprob)| TopToken { token_id, logprob }).collect(),
            });
            emitted[i] = vec![out.token];
        }
    }
    let drafts = match &h_all {
        Some(h) => draft_next(model, cache, registry, step, &starts, &emitted, h)?,
        None => vec![],
    };
    Ok(HeadOutput { tokens, drafts })
}

/// Feeds the MTP module the slots this step completed and drafts a token after each emission.
fn draft_next(
    model: &Model,
    cache: &mut LatentCache,
    registry: &mut Registry,
    step: &Step,
    starts: &[i64],
    emitted: &[Vec<u32>],
    h: &Tensor,
) -> Result<Vec<DraftToken>, StageError> {
    let mut hidden: Vec<Tensor> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    let mut steps: Vec<SeqStep> = Vec::new();
    let mut drafting: Vec<(u64, usize)> = Vec::new(); // (seq, index of its last slot)
    for (i, w) in step.seqs.iter().enumerate() {
        let s = registry.get_mut(w.seq_id).expect("registered");
        if !s.speculative {
            continue;
        }
        // Positions of this step whose tokens are now verified, and the tokens following them. A
        // verification's emitted tokens start with the (accepted or corrected) token after t_n.
        let (valid, following): (usize, Vec<u32>) = if w.verify_draft {
            (emitted[i].len(), emitted[i].clone())
        } else {
            (w.token_ids.len(), w.token_ids[1..].iter().chain(&emitted[i]).copied().collect())
        };
        let first_slot = hidden.len();
        if let Some(p) = s.pending_hidden.take() {
            hidden.push(p);
            next.push(w.token_ids[0]);
        }
        for j in 0..valid {
            let row = h.get(starts[i] + j as i64).unsqueeze(0);
            match following.get(j) {
                Some(&t) => {
                    hidden.push(row);
                    next.push(t);
                }
                // A prefill chunk's last state waits for the chunk after it.
                None => s.pending_hidden = Some(row),
            }
        }
        let n = hidden.len() - first_slot;
        if n == 0 {
            continue;
        }
        steps.push(SeqStep {
            cached: s.mtp_cached,
            new: n,
            pos_offset: s.pos_offset,
            block_table: s.block_table.clone(),
        });
        s.mtp_cached += n;
        if !emitted[i].is_empty() {
            drafting.push((w.seq_id, hidden.len() - 1));
        }
    }
    if steps.is_empty() {
        return Ok(vec![]);
    }
    let _p = profile::section("head.mtp");
    let plan = model.plan(steps, cache)?;
    let hm = model.mtp_hidden(&Tensor::cat(&hidden, 0), &next, &plan, cache)?;
    if drafting.is_empty() {
        return Ok(vec![]);
    }
    let rows: Vec<i64> = drafting.iter().map(|d| d.1 as i64).collect();
    let logits = model.logits(&select_rows(&hm, &rows))?.to_device(tch::Device::Cpu);
    let mut out = Vec::with_capacity(drafting.len());
    for (r, &(id, _)) in drafting.iter().enumerate() {
        let s = registry.get_mut(id).expect("registered");
        // The draft proposes the token after the last verified one.
        let generated = (s.cached + 1).saturating_sub(s.prompt_len) as u64;
        let d: Draft = speculative::draft(&logits.get(r as i64), &s.params, generated);
        out.push(DraftToken { seq_id: id, token_id: d.token });
        s.draft = Some(d);
    }
    Ok(out)
}
