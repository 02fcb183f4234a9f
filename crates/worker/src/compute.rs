//! The stage's compute side: one thread owns the model, its latent cache and the sequence registry,
//! and runs steps strictly in arrival order. The async service hands it steps over a channel.

use std::sync::mpsc;
use std::time::Instant;

use mlaserve_core::SamplingParams;
use mlaserve_model::{profile, LatentCache, Model, Sampler, SeqStep};
use mlaserve_proto::internal::v1::{HiddenStates, Step};
use tokio::sync::oneshot;

use crate::error::StageError;
use crate::head::{self, HeadOutput};
use crate::hidden;
use crate::registry::{Registry, SeqState};

/// What a step produced here.
pub enum StepOutput {
    /// Hidden states for the next stage.
    Hidden(HiddenStates),
    /// Sampled tokens and drafts (last stage).
    Tokens(HeadOutput),
    /// A step without sequences (only releases).
    Empty,
}

pub struct StepDone {
    pub output: StepOutput,
    pub compute_seconds: f64,
}

enum Job {
    Step(Box<Step>, oneshot::Sender<Result<StepDone, StageError>>),
    Reset(oneshot::Sender<()>),
    Active(oneshot::Sender<usize>),
}

/// Handle to the compute thread.
#[derive(Clone)]
pub struct Compute {
    tx: mpsc::Sender<Job>,
}

impl Compute {
    pub fn spawn(model: Model, num_blocks: usize, block_size: usize) -> Compute {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("mlaserve-compute".into())
            .spawn(move || {
                let mut engine = StageEngine::new(model, num_blocks, block_size);
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Step(step, reply) => {
                            let r = engine.run_step_guarded(&step);
                            // The next step comes after a round trip through the router.
                            mlaserve_model::kernels::pool::global().rest();
                            let _ = reply.send(r);
                        }
                        Job::Reset(reply) => {
                            engine.registry.clear();
                            let _ = reply.send(());
                        }
                        Job::Active(reply) => {
                            let _ = reply.send(engine.registry.len());
                        }
                    }
                }
            })
            .expect("spawn compute thread");
        Compute { tx }
    }

    pub async fn step(&self, step: Step) -> Result<StepDone, StageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Step(Box::new(step), tx))
            .map_err(|_| StageError::internal("compute thread is gone"))?;
        rx.await.map_err(|_| StageError::internal("compute thread dropped the step"))?
    }

    pub async fn reset(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Reset(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub async fn active_sequences(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Active(tx)).is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }
}

pub struct StageEngine {
    model: Model,
    cache: LatentCache,
    registry: Registry,
    sampler: Sampler,
}

impl StageEngine {
    pub fn new(model: Model, num_blocks: usize, block_size: usize) -> Self {
        let cache = model.new_cache(num_blocks, block_size);
        StageEngine { model, cache, registry: Registry::default(), sampler: Sampler }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Runs a step; a libtorch panic becomes an INTERNAL error for this step only.
    pub fn run_step_guarded(&mut self, step: &Step) -> Result<StepDone, StageError> {
        let started = Instant::now();
        let _p = profile::section("worker.step");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_step(step)));
        let output = match r {
            Ok(r) => r?,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                tracing::error!(step = step.step_id, "step failed: {msg}");
                return Err(StageError::internal(format!("step {} failed: {msg}", step.step_id)));
            }
        };
        Ok(StepDone { output, compute_seconds: started.elapsed().as_secs_f64() })
    }

    fn run_step(&mut self, step: &Step) -> Result<StepOutput, StageError> {
        for id in &step.release {
            self.registry.release(*id);
        }
        if step.seqs.is_empty() {
            return Ok(StepOutput::Empty);
        }
        let num_blocks = self.cache.num_blocks() as u32;
        // Validate everything before touching state, so a bad step leaves no trace.
        let mut seen = std::collections::HashSet::new();
        for w in &step.seqs {
            if !seen.insert(w.seq_id) {
                return Err(StageError::invalid(format!("sequence {} appears twice in step", w.seq_id)));
            }
            if w.token_ids.is_empty() {
                return Err(StageError::invalid(format!("sequence {} has no new tokens", w.seq_id)));
            }
            if w.verify_draft && w.end_speculation {
                return Err(StageError::invalid(format!(
                    "sequence {}: end_speculation with a draft to verify",
                    w.seq_id
                )));
            }
            if w.verify_draft && (w.token_ids.len() != 2 || !w.sample) {
                return Err(StageError::invalid(format!(
                    "sequence {}: a verification sends the last token and the draft, and samples",
                    w.seq_id
                )));
            }
            if let Some(&b) = w.new_blocks.iter().find(|&&b| b >= num_blocks) {
                return Err(StageError::invalid(format!(
                    "sequence {}: block {b} is outside the cache ({num_blocks} blocks)",
                    w.seq_id
                )));
            }
            match (self.registry.get(w.seq_id), &w.setup) {
                (Some(_), Some(_)) => {
                    return Err(StageError::failed_precondition(format!(
                        "sequence {} is already active",
                        w.seq_id
                    )))
                }
                (None, None) => {
                    return Err(StageError::failed_precondition(format!(
                        "sequence {} is unknown to layers {:?} (stage restarted?)",
                        w.seq_id,
                        self.model.layer_range()
                    )))
                }
                // After a verification the router may take back the rejected draft's slot.
                (Some(s), None) if s.rollback_allowed && w.cached as usize + 1 == s.cached => {}
                (Some(s), None) if s.cached != w.cached as usize => {
                    return Err(StageError::failed_precondition(format!(
                        "sequence {}: {} tokens cached here, step says {}",
                        w.seq_id, s.cached, w.cached
                    )))
                }
                (None, Some(setup))
                    if !setup.cached_tokens.is_empty() && setup.cached_tokens.len() != w.cached as usize =>
                {
                    return Err(StageError::invalid(format!(
                        "sequence {}: {} cached tokens listed for {} cached",
                        w.seq_id,
                        setup.cached_tokens.len(),
                        w.cached
                    )))
                }
                _ => {}
            }
        }
        // Register new sequences and grow block tables.
        let mut seq_steps = Vec::with_capacity(step.seqs.len());
        for w in &step.seqs {
            if let Some(setup) = &w.setup {
                let params = setup.sampling.as_ref().map(SamplingParams::from).unwrap_or_default();
                // A prefix-cache hit starts with `cached` tokens already in the (shared) blocks.
                self.registry.insert(
                    w.seq_id,
                    SeqState {
                        block_table: vec![],
                        cached: w.cached as usize,
                        pos_offset: setup.pos_offset as usize,
                        prompt_len: setup.prompt_len as usize,
                        speculative: setup.speculative && self.model.has_mtp() && params.may_speculate(),
                        params,
                        history: setup.cached_tokens.clone(),
                        rollback_allowed: false,
                        mtp_cached: w.cached as usize,
                        pending_hidden: None,
                        draft: None,
                    },
                );
            }
            let s = self.registry.get_mut(w.seq_id).expect("registered above");
            if w.end_speculation {
                s.speculative = false;
                s.draft = None;
                s.pending_hidden = None;
            }
            s.cached = w.cached as usize;
            s.block_table.extend_from_slice(&w.new_blocks);
            seq_steps.push(SeqStep {
                cached: s.cached,
                new: w.token_ids.len(),
                pos_offset: s.pos_offset,
                block_table: s.block_table.clone(),
            });
        }
        let result = self.compute(step, seq_steps);
        if result.is_err() {
            // The cache contents of these sequences are unknown now: forget them.
            for w in &step.seqs {
                self.registry.release(w.seq_id);
            }
        }
        result
    }

    fn compute(&mut self, step: &Step, seq_steps: Vec<SeqStep>) -> Result<StepOutput, StageError> {
        let plan = self.model.plan(seq_steps, &self.cache)?;
        let total = plan.total_tokens;
        let x = if self.model.is_first() {
            let ids: Vec<u32> = step.seqs.iter().flat_map(|w| w.token_ids.iter().copied()).collect();
            self.model.embed(&ids)?
        } else {
            let h = step.hidden.as_ref().ok_or_else(|| StageError::invalid("step lacks hidden states"))?;
            hidden::decode(h, total, self.model.config().hidden_size)?.to_device(self.model.device())
        };
        let x = self.model.forward_layers(x, &plan, &mut self.cache)?;
        for w in &step.seqs {
            let s = self.registry.get_mut(w.seq_id).expect("registered");
            s.cached += w.token_ids.len();
            s.rollback_allowed = w.verify_draft;
            if s.keeps_history() {
                s.history.extend_from_slice(&w.token_ids);
            }
        }
        if !self.model.is_last() {
            return Ok(StepOutput::Hidden(hidden::encode(&x)));
        }
        let _p = profile::section("worker.head");
        let out =
            head::run(&self.model, &mut self.cache, &mut self.registry, &self.sampler, step, &plan, &x)?;
        Ok(StepOutput::Tokens(out))
    }
}
