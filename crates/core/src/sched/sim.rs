//! A simulated pipeline for testing the planner: stages that keep a paged cache of (token, position)
//! entries and a "model" whose next token is a hash of the context it reads back from that cache.
//! A wrong block table, a block shared while written, a lost or doubled chunk, or a recompute that
//! skips a token changes what the model reads, and so the output; comparing with each sequence run
//! alone catches it. Steps execute in the order they were planned, possibly several planned before
//! the first result returns (a pipeline), as real stages do.

use std::collections::{HashMap, VecDeque};

use super::*;

pub const EOS: u32 = 7;
pub const VOCAB: u32 = 997;

/// splitmix64: a small seeded generator, so every case is reproducible from its seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// The model: next token after `context`.
pub fn next_token(context: &[u32]) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &t in context {
        h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
    }
    (h % u64::from(VOCAB)) as u32
}

/// What the stages hold.
pub struct SimStages {
    block_size: usize,
    slots: Vec<Option<(u32, usize)>>,
    tables: HashMap<SeqId, Vec<u32>>,
    rng: Rng,
    /// Chance that a draft is right.
    pub draft_quality: f64,
}

/// A step's result: per sampled sequence, its tokens and the next draft.
pub type SimResult = Vec<(SeqId, Vec<u32>, Option<u32>)>;

impl SimStages {
    pub fn new(num_blocks: usize, block_size: usize, seed: u64) -> Self {
        SimStages {
            block_size,
            slots: vec![None; num_blocks * block_size],
            tables: HashMap::new(),
            rng: Rng::new(seed),
            draft_quality: 0.6,
        }
    }

    fn slot(&self, table: &[u32], pos: usize) -> usize {
        crate::blocks::slot_of(table, self.block_size, pos)
    }

    /// Runs a step. `refs` gives each block's reference count as the step was planned: a block
    /// written must be held by its sequence alone.
    pub fn run(&mut self, step: &StepPlan, refs: &dyn Fn(u32) -> u32) -> SimResult {
        for id in &step.release {
            self.tables.remove(id);
        }
        let mut out = vec![];
        for it in &step.items {
            if it.setup {
                assert!(self.tables.insert(it.id, vec![]).is_none(), "seq {} set up twice", it.id);
            }
            let table =
                self.tables.get_mut(&it.id).unwrap_or_else(|| panic!("seq {} unknown to stages", it.id));
            table.extend_from_slice(&it.new_blocks);
            let table = table.clone();
            assert!(
                table.len() * self.block_size >= it.cached + it.tokens.len(),
                "seq {}: table too short",
                it.id
            );
            // The context as the cache holds it.
            let mut ctx: Vec<u32> = (0..it.cached)
                .map(|p| {
                    let (t, pos) = self.slots[self.slot(&table, p)]
                        .unwrap_or_else(|| panic!("seq {}: position {p} never written", it.id));
                    assert_eq!(pos, p, "seq {}: slot holds position {pos}, read as {p}", it.id);
                    t
                })
                .collect();
            for (i, &t) in it.tokens.iter().enumerate() {
                let p = it.cached + i;
                let block = table[p / self.block_size];
                assert_eq!(refs(block), 1, "seq {}: writes block {block}, which is shared", it.id);
                let s = self.slot(&table, p);
                self.slots[s] = Some((t, p));
            }
            if !it.sample {
                continue;
            }
            let mut toks = vec![];
            if it.verify {
                ctx.push(it.tokens[0]);
                let t1 = next_token(&ctx);
                toks.push(t1);
                if it.tokens[1] == t1 {
                    ctx.push(t1);
                    toks.push(next_token(&ctx));
                }
            } else {
                ctx.extend_from_slice(&it.tokens);
                toks.push(next_token(&ctx));
            }
            ctx.extend_from_slice(&toks[toks.len() - 1..]);
            let draft = if self.rng.chance(self.draft_quality) {
                next_token(&ctx)
            } else {
                (self.rng.next() % u64::from(VOCAB)) as u32
            };
            out.push((it.id, toks, Some(draft)));
        }
        out
    }
}

/// The emitter's part: appends up to the first finishing token.
pub fn outcome(
    planner: &Planner,
    id: SeqId,
    max_new: usize,
    toks: &[u32],
    verify: bool,
    draft: Option<u32>,
) -> SampleOutcome {
    let generated = planner.tokens(id).unwrap().len() - planner.prompt_len(id).unwrap();
    let mut taken = vec![];
    let mut finished = false;
    for &t in toks {
        taken.push(t);
        if t == EOS || generated + taken.len() >= max_new {
            finished = true;
            break;
        }
    }
    SampleOutcome {
        tokens: taken,
        draft_accepted: verify.then_some(toks.len() == 2),
        next_draft: draft,
        finished,
    }
}

/// Drives `planner` over `specs` arriving at the given ticks until every sequence is done.
/// Returns each accepted sequence's output (index into `specs` → tokens) and the refused indices.
pub struct Run {
    pub outputs: HashMap<usize, Vec<u32>>,
    pub refused: Vec<usize>,
    pub cancelled: Vec<usize>,
    pub steps: usize,
}

pub fn drive(
    planner: &mut Planner,
    specs: &[(SeqSpec, usize)],
    seed: u64,
    pipeline_depth: usize,
    cancel_chance: f64,
) -> Run {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let (blocks, bs) = (planner.allocator().num_blocks(), planner.allocator().block_size());
    let mut stages = SimStages::new(blocks, bs, seed);
    let mut id_of: HashMap<SeqId, usize> = HashMap::new();
    let mut run = Run { outputs: HashMap::new(), refused: vec![], cancelled: vec![], steps: 0 };
    let mut queue: VecDeque<(StepPlan, Vec<u32>)> = VecDeque::new();
    let mut next_spec = 0;
    let mut tick = 0usize;
    loop {
        while next_spec < specs.len() && specs[next_spec].1 <= tick {
            match planner.add(specs[next_spec].0.clone()) {
                Ok(id) => {
                    id_of.insert(id, next_spec);
                }
                Err(_) => run.refused.push(next_spec),
            }
            next_spec += 1;
        }
        if cancel_chance > 0.0 && rng.chance(cancel_chance) {
            let ids: Vec<SeqId> = planner.ids().into_iter().filter(|&i| !planner.is_in_flight(i)).collect();
            if !ids.is_empty() {
                let id = ids[rng.range(0, ids.len() - 1)];
                assert!(planner.remove(id));
                run.cancelled.push(id_of[&id]);
            }
        }
        // Plan up to `pipeline_depth` steps ahead, as the router does with several stages.
        while queue.len() < pipeline_depth {
            let Some(p) = planner.plan() else { break };
            let refs: Vec<u32> = (0..blocks as u32).map(|b| planner.allocator().ref_count(b)).collect();
            queue.push_back((p, refs));
            if rng.chance(0.3) {
                break;
            }
        }
        if let Some((step, refs)) = queue.pop_front() {
            run.steps += 1;
            let result = stages.run(&step, &|b| refs[b as usize]);
            let items = planner.step_done(step.step_id).expect("planned step");
            let mut by_id: HashMap<SeqId, (Vec<u32>, Option<u32>)> =
                result.into_iter().map(|(id, t, d)| (id, (t, d))).collect();
            for it in items {
                if !planner.contains(it.id) {
                    continue;
                }
                if !it.sample {
                    planner.prefilled(it.id, it.tokens);
                    continue;
                }
                let (toks, draft) = by_id.remove(&it.id).expect("sampled item has a result");
                let spec = &specs[id_of[&it.id]].0;
                let out = outcome(planner, it.id, spec.max_new_tokens, &toks, it.verify, draft);
                if out.finished {
                    let mut all = planner.tokens(it.id).unwrap().to_vec();
                    all.extend_from_slice(&out.tokens);
                    run.outputs.insert(id_of[&it.id], all[spec.prompt.len()..].to_vec());
                }
                planner.sampled(it.id, out);
            }
        } else if next_spec >= specs.len() && planner.ids().is_empty() {
            break;
        }
        tick += 1;
        assert!(tick < 200_000, "no progress: {:?}", planner.stats());
    }
    run
}

/// Each sequence alone in an ample pool.
pub fn alone(spec: &SeqSpec) -> Vec<u32> {
    let bs = 4;
    let blocks = (spec.prompt.len() + spec.max_new_tokens).div_ceil(bs) + 1;
    let cfg = PlannerConfig { prefix_caching: false, speculation: false, ..PlannerConfig::default() };
    let mut p = Planner::new(cfg, blocks, bs);
    let run = drive(&mut p, &[(SeqSpec { speculative: false, ..spec.clone() }, 0)], 1, 1, 0.0);
    run.outputs[&0].clone()
}
