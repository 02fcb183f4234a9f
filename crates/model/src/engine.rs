//! Single-process continuous batching over the paged cache: every request is prefilled in chunks
//! under a per-step token budget, mixed with the decodes of requests already running, and leaves the
//! batch when done. This is what `mlaserve generate` runs; the router drives the same steps over
//! pipeline stages.

use mlaserve_core::{BlockAllocator, SamplingParams};

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

struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    cached: usize,
    table: Vec<u32>,
    done: bool,
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
    alloc: BlockAllocator,
    step_tokens: usize,
    sampler: Sampler,
}

impl<'m> Engine<'m> {
    /// An engine with a cache of `num_blocks` blocks and at most `step_tokens` new tokens per step.
    pub fn new(model: &'m Model, num_blocks: usize, block_size: usize, step_tokens: usize) -> Self {
        Engine {
            stats: EngineStats::default(),
            model,
            cache: model.new_cache(num_blocks, block_size),
            alloc: BlockAllocator::new(num_blocks, block_size),
            step_tokens: step_tokens.max(1),
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
        let mut seqs: Vec<Seq> = reqs
            .iter()
            .map(|r| Seq {
                tokens: r.prompt.clone(),
                prompt_len: r.prompt.len(),
                cached: 0,
                table: vec![],
                done: r.max_new_tokens == 0,
            })
            .collect();
        self.stats = EngineStats::default();
        let result = self.run(reqs, &mut seqs);
        for s in &seqs {
            self.alloc.release(&s.table).map_err(|e| ModelError::Cache(e.to_string()))?;
        }
        result?;
        Ok(seqs.into_iter().map(|s| s.tokens[s.prompt_len..].to_vec()).collect())
    }

    fn run(&mut self, reqs: &[EngineRequest], seqs: &mut [Seq]) -> Result<()> {
        while seqs.iter().any(|s| !s.done) {
            let started = std::time::Instant::now();
            // Decodes first (one token each), then prefill chunks in request order under the budget.
            let mut budget = self.step_tokens;
            let mut work: Vec<(usize, usize)> = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                if !s.done && s.cached + 1 == s.tokens.len() && budget > 0 {
                    work.push((i, 1));
                    budget -= 1;
                }
            }
            for (i, s) in seqs.iter().enumerate() {
                let pending = s.tokens.len() - s.cached;
                if !s.done && pending > 1 && budget > 0 {
                    let n = pending.min(budget);
                    work.push((i, n));
                    budget -= n;
                }
            }
            work.sort_unstable();
            let prefilling = work.iter().any(|&(_, n)| n > 1);
            let mut steps = Vec::with_capacity(work.len());
            let mut ids = Vec::new();
            for &(i, n) in &work {
                let s = &mut seqs[i];
                self.alloc
                    .ensure_capacity(&mut s.table, s.cached + n)
                    .map_err(|e| ModelError::Cache(e.to_string()))?;
                ids.extend_from_slice(&s.tokens[s.cached..s.cached + n]);
                steps.push(SeqStep { cached: s.cached, new: n, pos_offset: 0, block_table: s.table.clone() });
            }
            let plan = {
                let _p = profile::section("plan");
                self.model.plan(steps, &self.cache)?
            };
            let x = self.model.forward_layers(self.model.embed(&ids)?, &plan, &mut self.cache)?;
            // Only sequences whose chunk reached their last token produce a new one.
            let sampled: Vec<usize> = work
                .iter()
                .enumerate()
                .filter(|(_, &(i, n))| seqs[i].cached + n == seqs[i].tokens.len())
                .map(|(k, _)| k)
                .collect();
            for &(i, n) in &work {
                seqs[i].cached += n;
            }
            if sampled.is_empty() {
                continue;
            }
            let rows: Vec<i64> = sampled.iter().map(|&k| plan.last_rows[k]).collect();
            let h = self
                .model
                .final_norm(&x.index_select(0, &tch::Tensor::from_slice(&rows).to_device(x.device())))?;
            let logits = {
                let _p = profile::section("lm_head");
                self.model.logits(&h)?
            };
            let _p = profile::section("sample");
            let sample_rows: Vec<SampleRow> = sampled
                .iter()
                .map(|&k| {
                    let s = &seqs[work[k].0];
                    SampleRow {
                        params: &reqs[work[k].0].params,
                        prompt: &s.tokens[..s.prompt_len],
                        output: &s.tokens[s.prompt_len..],
                        generated: (s.tokens.len() - s.prompt_len) as u64,
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
            }
            for (&k, o) in sampled.iter().zip(outs) {
                let i = work[k].0;
                let s = &mut seqs[i];
                s.tokens.push(o.token);
                let generated = s.tokens.len() - s.prompt_len;
                if generated >= reqs[i].max_new_tokens || reqs[i].stop_ids.contains(&o.token) {
                    s.done = true;
                }
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.num_free()
    }
}
