//! The planner's state and its one decision: the next step.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::blocks::{BlockAllocator, BlockHash};

use super::types::*;

/// The planner's view of one sequence.
#[derive(Debug, Clone)]
struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new_tokens: usize,
    /// Tokens whose latent entries are in the cache.
    cached: usize,
    table: Vec<u32>,
    /// Blocks of `table` the stages have been sent.
    sent_blocks: usize,
    /// The stages hold this sequence (set up in a sent step, not released since).
    registered: bool,
    in_flight: bool,
    /// Admitted at least once; prompt tokens found in the prefix cache then.
    admitted: bool,
    cached_prompt: usize,
    /// Hash chain of its full blocks, and how many of its blocks are registered for reuse.
    hashes: Vec<BlockHash>,
    registered_blocks: usize,
    speculative: bool,
    draft: Option<u32>,
    drafts: u32,
    accepted: u32,
    end_speculation: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn is_decode(&self) -> bool {
        self.cached + 1 == self.tokens.len()
    }
}

/// Sequences, the block pool and the steps in flight.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: PlannerConfig,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, Seq>,
    /// Arrival order (ids are assigned increasing).
    running: BTreeMap<SeqId, ()>,
    waiting: BTreeMap<SeqId, ()>,
    in_flight: HashMap<u64, Vec<InFlightItem>>,
    pending_release: Vec<SeqId>,
    next_id: SeqId,
    next_step: u64,
    preemptions: u64,
    drafts_proposed: u64,
    drafts_accepted: u64,
}

impl Planner {
    pub fn new(cfg: PlannerConfig, num_blocks: usize, block_size: usize) -> Self {
        Planner {
            cfg,
            alloc: BlockAllocator::new(num_blocks, block_size),
            seqs: HashMap::new(),
            running: BTreeMap::new(),
            waiting: BTreeMap::new(),
            in_flight: HashMap::new(),
            pending_release: vec![],
            next_id: 1,
            next_step: 1,
            preemptions: 0,
            drafts_proposed: 0,
            drafts_accepted: 0,
        }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.cfg
    }

    /// New limits (for a new pipeline); takes effect from the next step.
    pub fn set_config(&mut self, cfg: PlannerConfig) {
        self.cfg = cfg;
    }

    /// Tokens one sequence can hold: the whole pool.
    pub fn capacity_tokens(&self) -> usize {
        self.alloc.num_blocks() * self.alloc.block_size()
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// Queues a sequence; refused if it could not fit the pool even alone.
    pub fn add(&mut self, spec: SeqSpec) -> Result<SeqId, AddError> {
        if spec.prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        // The last sampled token is never cached, so prompt + max_new - 1 slots at most.
        let needed = spec.prompt.len() + spec.max_new_tokens.saturating_sub(1);
        if needed > self.capacity_tokens() {
            return Err(AddError::TooLarge {
                needed,
                prompt: spec.prompt.len(),
                max_new_tokens: spec.max_new_tokens,
                capacity: self.capacity_tokens(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Seq {
                prompt_len: spec.prompt.len(),
                tokens: spec.prompt,
                max_new_tokens: spec.max_new_tokens,
                cached: 0,
                table: vec![],
                sent_blocks: 0,
                registered: false,
                in_flight: false,
                admitted: false,
                cached_prompt: 0,
                hashes: vec![],
                registered_blocks: 0,
                speculative: spec.speculative,
                draft: None,
                drafts: 0,
                accepted: 0,
                end_speculation: false,
            },
        );
        self.waiting.insert(id, ());
        Ok(id)
    }

    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    pub fn is_in_flight(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.in_flight)
    }

    pub fn is_waiting(&self, id: SeqId) -> bool {
        self.waiting.contains_key(&id)
    }

    /// All tokens of a sequence (prompt and generated).
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    pub fn max_new_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.max_new_tokens)
    }

    pub fn prompt_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.prompt_len)
    }

    pub fn block_table(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.table.as_slice())
    }

    /// Prompt tokens found in the prefix cache when it was first admitted.
    pub fn cached_prompt(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.cached_prompt)
    }

    /// Whether it still speculates.
    pub fn speculative(&self, id: SeqId) -> bool {
        self.cfg.speculation && self.seqs.get(&id).is_some_and(|s| s.speculative)
    }

    pub fn ids(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.seqs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn stats(&self) -> PlannerStats {
        PlannerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            steps_in_flight: self.in_flight.len(),
            blocks_total: self.alloc.num_blocks(),
            blocks_free: self.alloc.num_free(),
            cached_blocks: self.alloc.num_cached(),
            preemptions: self.preemptions,
            prefix: self.alloc.prefix_stats().clone(),
            drafts_proposed: self.drafts_proposed,
            drafts_accepted: self.drafts_accepted,
        }
    }

    /// Gives a sequence's blocks back and forgets it (finished, cancelled, failed); the next step
    /// tells the stages. A sequence in flight may be removed too: the stages run steps in order, so
    /// its step finishes before any later step reuses the blocks, and its result is ignored.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else { return false };
        self.running.remove(&id);
        self.waiting.remove(&id);
        self.give_back(id, &mut seq);
        true
    }

    /// The one place a sequence's blocks return to the pool.
    fn give_back(&mut self, id: SeqId, seq: &mut Seq) {
        let table = std::mem::take(&mut seq.table);
        self.alloc.release(&table).expect("a sequence's table holds blocks it references");
        if seq.registered {
            self.pending_release.push(id);
        }
        seq.registered = false;
        seq.cached = 0;
        seq.sent_blocks = 0;
        seq.registered_blocks = 0;
        seq.draft = None;
        seq.end_speculation = false;
    }

    /// Forgets everything (the pipeline was lost or replaced): returns the ids that were known.
    pub fn reset(&mut self, num_blocks: usize, block_size: usize) -> Vec<SeqId> {
        let ids = self.ids();
        let fresh = Planner::new(self.cfg.clone(), num_blocks, block_size);
        *self = Planner { next_id: self.next_id, next_step: self.next_step, ..fresh };
        ids
    }

    /// The next step, or None when nothing can run now (or every in-flight slot is taken). With
    /// no work but sequences to release and nothing in flight, a release-only step.
    pub fn plan(&mut self) -> Option<StepPlan> {
        if self.in_flight.len() >= self.cfg.max_in_flight.max(1) {
            return None;
        }
        let mut b = Builder { budget: self.cfg.max_batch_tokens.max(1), ..Default::default() };
        let slots = self.cfg.max_in_flight.max(1) - self.in_flight.len();
        self.plan_decodes(&mut b, slots);
        self.plan_prefills(&mut b);
        // Admitting while running sequences wait for room (or were just preempted) only churns.
        if !b.denied && b.preempted.is_empty() {
            self.plan_admissions(&mut b);
        }
        if b.work.is_empty() && (self.pending_release.is_empty() || !self.in_flight.is_empty()) {
            return None;
        }
        Some(self.finish_plan(b))
    }

    fn plan_decodes(&mut self, b: &mut Builder, slots: usize) {
        let ready: Vec<SeqId> = self
            .running
            .keys()
            .copied()
            .filter(|id| !self.seqs[id].in_flight && self.seqs[id].is_decode())
            .collect();
        // Spread decodes over the free in-flight slots so every pipeline stage gets a micro-batch.
        let cap = ready.len().div_ceil(slots);
        let mut decodes = 0;
        for id in ready {
            if decodes >= cap || b.budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id).filter(|_| self.running.contains_key(&id)) else {
                continue; // preempted for an earlier sequence in this loop
            };
            let room = s.max_new_tokens.saturating_sub(s.generated());
            // A draft is verified only in room that is free: speculation never preempts anyone.
            let verify = self.cfg.speculation
                && s.speculative
                && s.draft.is_some()
                && room >= 2
                && b.budget >= 2
                && self.reachable(id) >= 2;
            let cached = s.cached;
            if verify && self.make_room(id, cached + 2, b) {
                b.push(id, 2, true);
            } else if self.make_room(id, cached + 1, b) {
                b.push(id, 1, false);
            } else {
                b.denied = true;
                continue;
            }
            decodes += 1;
        }
    }

    fn plan_prefills(&mut self, b: &mut Builder) {
        let partial: Vec<SeqId> = self
            .running
            .keys()
            .copied()
            .filter(|id| {
                let s = &self.seqs[id];
                !s.in_flight && !b.busy.contains(id) && s.tokens.len() - s.cached > 1
            })
            .collect();
        let bs = self.alloc.block_size();
        for id in partial {
            if b.budget == 0 {
                break;
            }
            if !self.running.contains_key(&id) {
                continue;
            }
            // Take what fits without preempting; preempt only when not even one token fits.
            if self.reachable(id) == 0 && !self.make_room(id, self.seqs[&id].cached + 1, b) {
                b.denied = true;
                continue;
            }
            let s = &self.seqs[&id];
            let n = (s.tokens.len() - s.cached).min(b.budget).min(self.reachable(id));
            let s = self.seqs.get_mut(&id).expect("running");
            self.alloc.ensure_capacity(&mut s.table, s.cached + n).expect("reachable slots fit");
            debug_assert!(s.table.len() * bs >= s.cached + n);
            b.push(id, n, false);
        }
    }

    fn plan_admissions(&mut self, b: &mut Builder) {
        let bs = self.alloc.block_size();
        while b.budget > 0 && self.running.len() < self.cfg.max_running {
            let Some((&id, _)) = self.waiting.first_key_value() else { break };
            let s = self.seqs.get_mut(&id).expect("waiting");
            if s.in_flight {
                break; // preempted this step while its last step is still out
            }
            // Cached blocks of the same prefix are taken instead of recomputed; at least the last
            // token is always computed, since it yields the logits.
            if self.cfg.prefix_caching && s.table.is_empty() {
                self.alloc.hasher().extend_chain(&mut s.hashes, &s.tokens, bs);
                let shared = self.alloc.match_prefix(&s.hashes, (s.tokens.len() - 1) / bs);
                s.cached = shared.len() * bs;
                s.registered_blocks = shared.len();
                s.table = shared;
            }
            // The watermark keeps room for running sequences to grow; with none, it guards nothing.
            let free = self.alloc.num_free();
            let watermark = if self.running.is_empty() { 0 } else { self.cfg.admission_watermark_blocks };
            let spare = free.saturating_sub(watermark);
            let fits = (s.table.len() + spare) * bs - s.cached;
            let n = (s.tokens.len() - s.cached).min(b.budget).min(fits);
            if n == 0 {
                let mut table = std::mem::take(&mut s.table);
                s.cached = 0;
                s.registered_blocks = 0;
                self.alloc.release(&table).expect("matched blocks are held");
                table.clear();
                break;
            }
            self.alloc.ensure_capacity(&mut s.table, s.cached + n).expect("within the spare blocks");
            if !s.admitted {
                s.admitted = true;
                s.cached_prompt = s.cached;
                b.admitted.push(id);
            }
            self.waiting.remove(&id);
            self.running.insert(id, ());
            b.push(id, n, false);
        }
    }

    /// Slots `id` can reach without preempting: its table's spare slots plus the free blocks.
    fn reachable(&self, id: SeqId) -> usize {
        let s = &self.seqs[&id];
        let bs = self.alloc.block_size();
        (s.table.len() + self.alloc.num_free()) * bs - s.cached
    }

    /// Grows `id`'s table to `tokens` slots, preempting the most recently arrived running
    /// sequences that arrived after it. False when that is not possible in this step.
    fn make_room(&mut self, id: SeqId, tokens: usize, b: &mut Builder) -> bool {
        loop {
            let s = self.seqs.get_mut(&id).expect("running");
            if self.alloc.ensure_capacity(&mut s.table, tokens).is_ok() {
                return true;
            }
            let Some((&victim, _)) = self.running.last_key_value() else { return false };
            if victim <= id || self.seqs[&victim].in_flight {
                return false;
            }
            if let Some(n) = b.unpush(victim) {
                b.budget += n;
            }
            self.preempt(victim);
            b.preempted.push(victim);
        }
    }

    fn preempt(&mut self, id: SeqId) {
        let mut seq = self.seqs.remove(&id).expect("running");
        self.running.remove(&id);
        self.give_back(id, &mut seq);
        self.preemptions += 1;
        self.seqs.insert(id, seq);
        self.waiting.insert(id, ());
    }

    fn finish_plan(&mut self, b: Builder) -> StepPlan {
        let step_id = self.next_step;
        self.next_step += 1;
        let mut work = b.work;
        work.sort_unstable_by_key(|w| w.0);
        let mut items = Vec::with_capacity(work.len());
        let mut record = Vec::with_capacity(work.len());
        for (id, n, verify) in work {
            let s = self.seqs.get_mut(&id).expect("planned");
            let sample = verify || s.cached + n == s.tokens.len();
            let tokens = if verify {
                vec![s.tokens[s.cached], s.draft.take().expect("a verification has a draft")]
            } else {
                s.draft = None;
                s.tokens[s.cached..s.cached + n].to_vec()
            };
            items.push(WorkItem {
                id,
                cached: s.cached,
                tokens,
                new_blocks: s.table[s.sent_blocks..].to_vec(),
                sample,
                verify,
                setup: !s.registered,
                end_speculation: std::mem::take(&mut s.end_speculation),
            });
            s.sent_blocks = s.table.len();
            s.registered = true;
            s.in_flight = true;
            record.push(InFlightItem { id, tokens: n, sample, verify });
        }
        self.in_flight.insert(step_id, record);
        StepPlan {
            step_id,
            release: std::mem::take(&mut self.pending_release),
            items,
            admitted: b.admitted,
            preempted: b.preempted,
        }
    }

    /// A step's result arrived (or it failed): its sequences are no longer in flight. Returns its
    /// items (None for an unknown step).
    pub fn step_done(&mut self, step_id: u64) -> Option<Vec<InFlightItem>> {
        let items = self.in_flight.remove(&step_id)?;
        for it in &items {
            if let Some(s) = self.seqs.get_mut(&it.id) {
                s.in_flight = false;
            }
        }
        Some(items)
    }

    /// A prefill chunk of `tokens` tokens that samples nothing was computed.
    pub fn prefilled(&mut self, id: SeqId, tokens: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.cached = (s.cached + tokens).min(s.tokens.len() - 1);
            self.register_blocks(id);
        }
    }

    /// A sampled item's outcome: appends its tokens, records the verification, and frees the
    /// sequence when it finished.
    pub fn sampled(&mut self, id: SeqId, out: SampleOutcome) {
        let (min_acc, probation) = (self.cfg.speculative_min_acceptance, self.cfg.speculation_probation);
        let Some(s) = self.seqs.get_mut(&id) else { return };
        if let Some(accepted) = out.draft_accepted {
            self.drafts_proposed += 1;
            s.drafts += 1;
            if accepted {
                self.drafts_accepted += 1;
                s.accepted += 1;
            }
            // A draft that is rarely right costs a wider step (and the MTP pass) for little.
            if s.drafts >= probation && f64::from(s.accepted) < min_acc * f64::from(s.drafts) {
                s.speculative = false;
                s.end_speculation = true;
            }
        }
        s.tokens.extend_from_slice(&out.tokens);
        if out.finished {
            self.remove(id);
            return;
        }
        // Everything but the newest token is cached (a rejected draft's slot is not).
        s.cached = s.tokens.len() - 1;
        s.draft = if s.speculative { out.next_draft } else { None };
        self.register_blocks(id);
    }

    /// Registers the sequence's newly computed full blocks for prefix reuse.
    fn register_blocks(&mut self, id: SeqId) {
        if !self.cfg.prefix_caching {
            return;
        }
        let bs = self.alloc.block_size();
        let s = self.seqs.get_mut(&id).expect("known");
        let full = s.cached / bs;
        if full > s.registered_blocks {
            self.alloc.hasher().extend_chain(&mut s.hashes, &s.tokens[..full * bs], bs);
            self.alloc.register(&s.hashes[s.registered_blocks..full], &s.table[s.registered_blocks..full]);
            s.registered_blocks = full;
        }
    }
}

/// A step being filled.
#[derive(Default)]
struct Builder {
    budget: usize,
    /// (sequence, tokens, verify)
    work: Vec<(SeqId, usize, bool)>,
    busy: HashSet<SeqId>,
    admitted: Vec<SeqId>,
    preempted: Vec<SeqId>,
    /// A running sequence got no room in this step: admit nobody.
    denied: bool,
}

impl Builder {
    fn push(&mut self, id: SeqId, n: usize, verify: bool) {
        self.work.push((id, n, verify));
        self.busy.insert(id);
        self.budget -= n;
    }

    /// Takes a planned sequence out of the step again (it is being preempted); its token count.
    fn unpush(&mut self, id: SeqId) -> Option<usize> {
        let i = self.work.iter().position(|w| w.0 == id)?;
        self.busy.remove(&id);
        self.admitted.retain(|&a| a != id);
        Some(self.work.remove(i).1)
    }
}
