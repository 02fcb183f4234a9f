//! A planned step as the stages receive it, with its span.

use std::collections::HashMap;

use mlaserve_core::sched::{Planner, SeqId, StepPlan};
use mlaserve_proto::internal::v1::{SamplingSettings, SeqWork, SequenceSetup, Step};
use mlaserve_telemetry::propagation;

use super::emitter::Stream;

/// The wire step for `plan`, and the step's span (in the trace of its oldest request, linked to
/// the others'), which stays open until the result arrives.
pub(super) fn step(
    plan: &StepPlan,
    planner: &Planner,
    streams: &HashMap<SeqId, Stream>,
    tracing_on: bool,
) -> (Step, tracing::Span) {
    let tokens: usize = plan.items.iter().map(|w| w.tokens.len()).sum();
    let span = if plan.items.is_empty() {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            parent: None,
            "step",
            step_id = plan.step_id,
            batch_size = plan.items.len(),
            tokens,
            "otel.kind" = "internal"
        )
    };
    let trace_context = if tracing_on && !plan.items.is_empty() {
        let ctxs: Vec<_> = plan
            .items
            .iter()
            .filter_map(|w| streams.get(&w.id))
            .map(|s| propagation::span_context(&s.span))
            .collect();
        if let Some(first) = ctxs.first() {
            propagation::set_parent_span(&span, first);
        }
        propagation::add_links(&span, ctxs.get(1..).unwrap_or_default());
        propagation::inject_span(&span)
    } else {
        Default::default()
    };
    let seqs = plan
        .items
        .iter()
        .map(|w| {
            let setup = w.setup.then(|| {
                let sampling = streams.get(&w.id).map(|s| s.req.sampling.clone()).unwrap_or_default();
                let tokens = planner.tokens(w.id).unwrap_or_default();
                SequenceSetup {
                    // Penalties need the tokens a prefix-cache hit skipped.
                    cached_tokens: if sampling.has_penalties() {
                        tokens[..w.cached].to_vec()
                    } else {
                        vec![]
                    },
                    sampling: Some(SamplingSettings::from(&sampling)),
                    pos_offset: 0,
                    prompt_len: planner.prompt_len(w.id).unwrap_or_default() as u32,
                    speculative: planner.speculative(w.id),
                }
            });
            SeqWork {
                seq_id: w.id,
                cached: w.cached as u32,
                token_ids: w.tokens.clone(),
                new_blocks: w.new_blocks.clone(),
                sample: w.sample,
                setup,
                verify_draft: w.verify,
                end_speculation: w.end_speculation,
            }
        })
        .collect();
    let step = Step {
        step_id: plan.step_id,
        release: plan.release.clone(),
        seqs,
        hidden: None,
        trace_context,
        failed: None,
    };
    (step, span)
}
