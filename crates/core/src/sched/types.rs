//! What goes into and comes out of the planner.

use crate::blocks::PrefixStats;

/// A sequence's id: assigned in arrival order, so a smaller id arrived earlier.
pub type SeqId = u64;

/// Batching limits.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    /// New tokens per step across all sequences (prefill chunks plus one or two per decode).
    pub max_batch_tokens: usize,
    /// Sequences holding cache blocks at once.
    pub max_running: usize,
    /// Steps in flight at once (one per pipeline stage keeps every stage busy).
    pub max_in_flight: usize,
    /// Free blocks kept back when admitting, so running sequences can grow.
    pub admission_watermark_blocks: usize,
    /// Share full blocks of equal prompt prefixes.
    pub prefix_caching: bool,
    /// Drafts may be verified (speculation asked for and the pipeline can draft).
    pub speculation: bool,
    /// After `speculation_probation` verified drafts, a sequence accepting fewer than this share
    /// stops speculating; 0 = never.
    pub speculative_min_acceptance: f64,
    pub speculation_probation: u32,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            max_batch_tokens: 512,
            max_running: 256,
            max_in_flight: 1,
            admission_watermark_blocks: 1,
            prefix_caching: true,
            speculation: false,
            speculative_min_acceptance: 0.5,
            speculation_probation: 16,
        }
    }
}

/// A new sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSpec {
    pub prompt: Vec<u32>,
    /// Tokens it may generate (the emitter ends it there at the latest).
    pub max_new_tokens: usize,
    /// It may verify speculative drafts (its sampling allows it).
    pub speculative: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the request needs up to {needed} tokens of latent cache (prompt {prompt} + max_new_tokens \
         {max_new_tokens}), more than the {capacity} tokens the cache pool holds; shorten the prompt or \
         lower max_new_tokens"
    )]
    TooLarge { needed: usize, prompt: usize, max_new_tokens: usize, capacity: usize },
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItem {
    pub id: SeqId,
    /// Tokens already in the cache before this step.
    pub cached: usize,
    /// The tokens to feed: a prefill chunk, the last token, or the last token and a draft.
    pub tokens: Vec<u32>,
    /// Blocks of the sequence's table the stages have not been sent yet, in table order.
    pub new_blocks: Vec<u32>,
    /// The step yields a token for it (its chunk reaches its last token).
    pub sample: bool,
    /// `tokens` = [last token, draft]: verify the draft.
    pub verify: bool,
    /// The stages do not hold this sequence yet (new, or recomputed after preemption).
    pub setup: bool,
    /// Tell the stages it stopped speculating.
    pub end_speculation: bool,
}

/// A step: sequences to release first, then the work, in sequence-id order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepPlan {
    pub step_id: u64,
    /// Sequences the stages should forget (finished, cancelled, preempted).
    pub release: Vec<SeqId>,
    pub items: Vec<WorkItem>,
    /// Sequences admitted for the first time in this step.
    pub admitted: Vec<SeqId>,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<SeqId>,
}

/// What the planner remembers of an item until its step's result arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlightItem {
    pub id: SeqId,
    pub tokens: usize,
    pub sample: bool,
    pub verify: bool,
}

/// A sampled item's result, as the emitter decided it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SampleOutcome {
    /// Tokens appended to the sequence (up to two after a verification; fewer if it finished).
    pub tokens: Vec<u32>,
    /// For a verification: whether the draft was accepted.
    pub draft_accepted: Option<bool>,
    /// The draft to verify in its next step.
    pub next_draft: Option<u32>,
    /// The sequence is done (its blocks go back).
    pub finished: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlannerStats {
    pub running: usize,
    pub waiting: usize,
    pub steps_in_flight: usize,
    pub blocks_total: usize,
    pub blocks_free: usize,
    pub cached_blocks: usize,
    pub preemptions: u64,
    pub prefix: PrefixStats,
    pub drafts_proposed: u64,
    pub drafts_accepted: u64,
}
