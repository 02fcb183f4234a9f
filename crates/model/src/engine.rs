//! Single-process continuous batching over the paged cache: every request is prefilled in chunks
//! under a per-step token budget, mixed with the decodes of requests already running, and leaves the
//! batch when done. This is what `mlaserve generate` runs. The steps come from the same planner the
//! router uses over pipeline stages (`mlaserve_core::sched`), so there is one batching policy and
//! the parity tests exercise it, preemption included when the cache is small.

use mlaserve_core::sched::{Planner, PlannerConfig, SampleOutcome, SeqId, SeqSpec};
use mlaserve_core::SamplingParams;

use crate::batch::SeqStep;
use crate::cache::LatentCache;
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::profile;
use crate::sampling::{SampleRow, Sampler};

#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub params: SamplingParams,
    /// Generation ends after any of these tokens (e.g. EOS), which is kept in the output.
    pub stop_ids: Vec<u32>,
}

/// Wall-clock split of the last `generate` call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    /// Steps that still prefilled some prompt.
    pub prefill_secs: f64,
    pub prefill_steps: usize,
    /// Pure decode steps, and the tokens they produced.
    pub decode_secs: f64,
    pub decode_steps: usize,
    pub decode_tokens: usize,
}

pub struct Engine<'m> {
    stats: EngineStats,
    model: &'m Model,
    cache: LatentCache,
    planner: Planner,
    sampler: Sampler,
}

impl<'m> Engine<'m> {
    /// An engine with a cache of `num_blocks` blocks and at most `step_tokens` new tokens per step.
    pub fn new(model: &'m Model, num_blocks: usize, block_size: usize, step_tokens: usize) -> Self {
        let cfg = PlannerConfig {
            max_batch_tokens: step_tokens.max(1),
            max_running: usize::MAX,
            max_in_flight: 1,
            admission_watermark_blocks: 0,
            prefix_caching: false,
            speculation: false,
            ..PlannerConfig::default()
        };
        Engine {
            stats: EngineStats::default(),
            model,
            cache: model.new_cache(num_blocks, block_size),
            planner: Planner::new(cfg, num_blocks, block_size),
            sampler: Sampler,
        }
    }

    /// Blocks needed to run `reqs` all at once.
    pub fn blocks_needed(reqs: &[EngineRequest], block_size: usize) -> usize {
        reqs.iter().map(|r| (r.prompt.len() + r.max_new_tokens).div_ceil(block_size)).sum()
    }

    /// Generates for all requests together; returns the new tokens of each, in order.
    pub fn generate(&mut self, reqs: &[EngineRequest]) -> Result<Vec<Vec<u32>>> {
        if let Some(i) = reqs.iter().position(|r| r.prompt.is_empty()) {
            return Err(ModelError::Input(format!("prompt {i} is empty")));
        }
        self.stats = EngineStats::default();
        let mut outputs = vec![vec![]; reqs.len()];
        let mut index: std::collections::HashMap<SeqId, usize> = Default::default();
        for (i, r) in reqs.iter().enumerate().filter(|(_, r)| r.max_new_tokens > 0) {
            let spec =
                SeqSpec { prompt: r.prompt.clone(), max_new_tokens: r.max_new_tokens, speculative: false };
            match self.planner.add(spec) {
                Ok(id) => {
                    index.insert(id, i);
                }
                Err(e) => {
                    self.forget_all();
                    return Err(ModelError::Input(format!("request {i}: {e}")));
                }
            }
        }
        let result = self.run(reqs, &index, &mut outputs);
        self.forget_all();
        result.map(|()| outputs)
    }

    /// Ends every sequence (after an error): blocks back, nothing left queued.
    fn forget_all(&mut self) {
        for id in self.planner.ids() {
            self.planner.remove(id);
        }
        while self.planner.plan().is_some_and(|p| self.planner.step_done(p.step_id).is_some()) {}
    }

    fn run(
        &mut self,
        reqs: &[EngineRequest],
        index: &std::collections::HashMap<SeqId, usize>,
        outputs: &mut [Vec<u32>],
    ) -> Result<()> {
        let mut replay = profile::ReplayFloor::default();
        while !self.planner.ids().is_empty() {
            let started = std::time::Instant::now();
            let plan = self.planner.plan().ok_or_else(|| {
                ModelError::Cache(format!("the batch cannot progress: {:?}", self.planner.stats()))
            })?;
            let prefilling = plan.items.iter().any(|w| w.tokens.len() > 1 || !w.sample);
            replay.before_step(!prefilling);
            let mut steps = Vec::with_capacity(plan.items.len());
            let mut ids = Vec::new();
            for w in &plan.items {
                ids.extend_from_slice(&w.tokens);
                let table = self.planner.block_table(w.id).expect("planned").to_vec();
                steps.push(SeqStep {
                    cached: w.cached,
                    new: w.tokens.len(),
                    pos_offset: 0,
                    block_table: table,
                });
            }
            let items = self.planner.step_done(plan.step_id).expect("just planned");
            if steps.is_empty() {
                continue; // a release-only step: nothing to compute in one process
            }
            let mplan = {
                let _p = profile::section("plan");
                self.model.plan(steps, &self.cache)?
            };
            let x = self.model.forward_layers(self.model.embed(&ids)?, &mplan, &mut self.cache)?;
            // Only sequences whose chunk reached their last token produce a new one.
            let sampled: Vec<usize> = (0..items.len()).filter(|&k| items[k].sample).collect();
            for it in items.iter().filter(|it| !it.sample) {
                self.planner.prefilled(it.id, it.tokens);
            }
            if sampled.is_empty() {
                // A prefill chunk that samples nothing still counts as prefill time.
                self.stats.prefill_secs += started.elapsed().as_secs_f64();
                self.stats.prefill_steps += 1;
                continue;
            }
            let rows: Vec<i64> = sampled.iter().map(|&k| mplan.last_rows[k]).collect();
            let h = self.model.final_norm(&crate::batch::select_rows(&x, &rows))?;
            let logits = {
                let _p = profile::section("lm_head");
                self.model.logits(&h)?
            };
            let sample_section = profile::section("sample");
            let sample_rows: Vec<SampleRow> = sampled
                .iter()
                .map(|&k| {
                    let id = items[k].id;
                    let tokens = self.planner.tokens(id).expect("planned");
                    let prompt_len = self.planner.prompt_len(id).expect("planned");
                    SampleRow {
                        params: &reqs[index[&id]].params,
                        prompt: &tokens[..prompt_len],
                        output: &tokens[prompt_len..],
                        generated: (tokens.len() - prompt_len) as u64,
                    }
                })
                .collect();
            let outs = self.sampler.sample(&logits, &sample_rows)?;
            let secs = started.elapsed().as_secs_f64();
            if prefilling {
                self.stats.prefill_secs += secs;
                self.stats.prefill_steps += 1;
            } else {
                self.stats.decode_secs += secs;
                self.stats.decode_steps += 1;
                self.stats.decode_tokens += outs.len();
                drop(sample_section);
                replay.after_decode_step();
            }
            for (&k, o) in sampled.iter().zip(outs) {
                let (id, i) = (items[k].id, index[&items[k].id]);
                let out = &mut outputs[i];
                out.push(o.token);
                let finished = out.len() >= reqs[i].max_new_tokens || reqs[i].stop_ids.contains(&o.token);
                self.planner
                    .sampled(id, SampleOutcome { tokens: vec![o.token], finished, ..Default::default() });
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn free_blocks(&self) -> usize {
        self.planner.allocator().num_free()
    }
}
