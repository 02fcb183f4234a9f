//! The step planner: which sequences run in the next step, with how many tokens, in which cache
//! blocks. Pure bookkeeping (no I/O, no async, no wire types), shared by the router, which sends the
//! plans to the pipeline stages, and by `mlaserve generate`, which computes them in-process.
//!
//! Policy, in the order a step is filled under its token budget:
//! 1. decodes of running sequences, oldest first (two tokens when a speculative draft is verified
//!    and there is room for both, else one);
//! 2. chunks of running sequences still prefilling, oldest first;
//! 3. admissions from the waiting queue in arrival order (none may overtake the head), only when no
//!    running sequence was denied room in this step, keeping a watermark of free blocks back.
//!
//! When a running sequence needs a block and none is free, the victim is the most recently arrived
//! running sequence, never one that arrived before the sequence that needs room. A victim still in
//! flight cannot give its blocks back yet: the sequence waits for the next step. A preempted
//! sequence returns to the waiting queue at its arrival position and is recomputed from its tokens,
//! which keeps greedy output exact. A sequence that cannot fit the pool even alone is refused when
//! it is added.

mod planner;
mod types;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use planner::Planner;
pub use types::{
    AddError, InFlightItem, PlannerConfig, PlannerStats, SampleOutcome, SeqId, SeqSpec, StepPlan, WorkItem,
};
