//! The scheduler task: one owner of the planner (sequences and blocks), the streams and the
//! connection. It applies the planner's steps to the pipeline and the pipeline's results to the
//! planner and the streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlaserve_core::sched::{AddError, Planner, PlannerConfig, SampleOutcome, SeqId, SeqSpec};
use mlaserve_core::ModelConfig;
use mlaserve_proto::internal::v1::{SampledToken, StepResult};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use mlaserve_telemetry::genai::RouterMetrics;

use super::connection::{Connected, Connection};
use super::emitter::{EmitContext, ResponseTx, Stream};
use super::wire;
use super::{Command, Snapshot};
use crate::options::{RouterOptions, SPECULATION_PROBATION};
use crate::pipeline::{CacheGeometry, Pipeline, PipelineEvent, StageEndpoint};
use crate::request::ValidRequest;
use crate::tokenizer::TokenizerInfo;

/// A step on its way through the pipeline.
struct Sent {
    /// The step's span, open until its result arrives.
    _span: tracing::Span,
    at: Instant,
    has_work: bool,
}

pub(super) struct Scheduler {
    pub tok: Arc<TokenizerInfo>,
    pub opts: RouterOptions,
    pub planner: Planner,
    pub streams: HashMap<SeqId, Stream>,
    sent: HashMap<u64, Sent>,
    pub conn: Connection,
    /// The model's context, and the longest sequence the connected pipeline holds.
    pub base_max_total: usize,
    pub max_total_tokens: usize,
    pub max_total_shared: Arc<AtomicUsize>,
    pub queued: Arc<AtomicUsize>,
    pub metrics: RouterMetrics,
    pub tracing_on: bool,
    /// The last stage holds an MTP module (speculation possible).
    pub mtp_available: bool,
    /// Test-only fault injection: panic after sending this many steps.
    pub panic_after_steps: Option<u64>,
    steps_sent: u64,
}

impl Scheduler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tok: Arc<TokenizerInfo>,
        config: &ModelConfig,
        opts: RouterOptions,
        conn: Connection,
        max_total_shared: Arc<AtomicUsize>,
        queued: Arc<AtomicUsize>,
        metrics: RouterMetrics,
        tracing_on: bool,
    ) -> Self {
        let planner = Planner::new(planner_config(&opts, 1, false), 0, 1);
        Scheduler {
            tok,
            planner,
            streams: HashMap::new(),
            sent: HashMap::new(),
            conn,
            base_max_total: config.max_position_embeddings,
            max_total_tokens: config.max_position_embeddings,
            max_total_shared,
            queued,
            metrics,
            tracing_on,
            mtp_available: false,
            panic_after_steps: std::env::var("MLASERVE_FAULT_SCHEDULER_PANIC_AFTER_STEPS")
                .ok()
                .and_then(|v| v.parse().ok()),
            steps_sent: 0,
            opts,
        }
    }

    pub async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut events: mpsc::Receiver<(u64, PipelineEvent)>,
        mut connected: mpsc::Receiver<Connected>,
    ) {
        self.conn.start_reconnect();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            self.reap();
            if self.conn.pipeline.is_some() {
                self.fill().await;
            }
            self.record_gauges();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Submit(req, tx, span)) => self.enqueue(*req, tx, span),
                    Some(Command::Snapshot(reply)) => { let _ = reply.send(self.snapshot()); }
                    None => break,
                },
                Some((epoch, ev)) = events.recv() => {
                    if epoch == self.conn.epoch {
                        match ev {
                            PipelineEvent::Result(r) => self.on_result(r),
                            PipelineEvent::Failed(status) => self.pipeline_failed(status),
                        }
                    }
                }
                Some((epoch, stages, geometry, pipeline)) = connected.recv() => {
                    if epoch == self.conn.epoch {
                        self.on_connected(stages, geometry, pipeline);
                    }
                }
                _ = tick.tick() => {}
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.planner.stats();
        Snapshot {
            healthy: self.conn.pipeline.is_some(),
            last_error: self.conn.last_error.lock().ok().and_then(|e| e.clone()),
            stages: self.conn.stage_health.lock().map(|h| h.clone()).unwrap_or_default(),
            geometry: self.conn.geometry,
            blocks_free: st.blocks_free,
            running: st.running,
            waiting: st.waiting,
            steps_in_flight: st.steps_in_flight,
            preemptions: st.preemptions,
            prefix: st.prefix,
            cached_blocks: st.cached_blocks,
            speculative: self.opts.speculative && self.mtp_available,
            drafts_proposed: st.drafts_proposed,
            drafts_accepted: st.drafts_accepted,
        }
    }

    fn enqueue(&mut self, req: ValidRequest, tx: ResponseTx, span: tracing::Span) {
        if self.conn.pipeline.is_none() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(Err(Status::unavailable("the model pipeline is not available")));
            return;
        }
        let spec = SeqSpec {
            prompt: req.prompt_ids.clone(),
            max_new_tokens: req.max_new_tokens,
            speculative: self.opts.speculative && req.sampling.may_speculate(),
        };
        match self.planner.add(spec) {
            Ok(id) => {
                tracing::debug!(seq = id, request_id = %req.request_id, prompt = req.prompt_ids.len(), "queued");
                self.streams.insert(id, Stream::new(req, tx, span));
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                let status = match e {
                    AddError::EmptyPrompt => Status::invalid_argument(e.to_string()),
                    AddError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
                };
                Stream::new(req, tx, span).fail(status);
            }
        }
    }

    /// Ends a sequence's stream with `status` and gives its blocks back.
    fn drop_seq(&mut self, id: SeqId, status: Status) {
        self.planner.remove(id);
        if let Some(mut s) = self.streams.remove(&id) {
            self.dequeued(&mut s);
            s.fail(status);
        }
    }

    fn dequeued(&self, s: &mut Stream) {
        if s.queued {
            s.queued = false;
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Ends sequences whose client left or whose deadline passed (those not in flight; the others
    /// when their step returns).
    fn reap(&mut self) {
        let now = Instant::now();
        let gone: Vec<(SeqId, Status)> = self
            .streams
            .iter()
            .filter(|(id, _)| !self.planner.is_in_flight(**id))
            .filter_map(|(&id, s)| s.gone(now).map(|st| (id, st)))
            .collect();
        for (id, status) in gone {
            self.drop_seq(id, status);
        }
    }

    fn record_gauges(&self) {
        let (m, st) = (&self.metrics, self.planner.stats());
        m.running.record(st.running as u64, &m.base);
        m.waiting.record(st.waiting as u64, &m.base);
        m.blocks_used.record((st.blocks_total - st.blocks_free) as u64, &m.base);
        m.blocks_free.record(st.blocks_free as u64, &m.base);
    }

    /// Sends steps until every pipeline slot is busy or nothing can run.
    async fn fill(&mut self) {
        while let Some(plan) = self.planner.plan() {
            let now = Instant::now();
            for id in &plan.admitted {
                let Some(mut s) = self.streams.remove(id) else { continue };
                self.dequeued(&mut s);
                s.first_scheduled = Some(now);
                s.queue_span = None;
                let m = &self.metrics;
                m.queue_duration.record(now.duration_since(s.req.arrival).as_secs_f64(), &m.base);
                m.prompt_tokens.add(s.req.prompt_ids.len() as u64, &m.base);
                self.streams.insert(*id, s);
            }
            for &id in &plan.preempted {
                tracing::info!(seq = id, "preempted (will recompute)");
                self.metrics.preemptions.add(1, &self.metrics.base);
            }
            let (step, span) = wire::step(&plan, &self.planner, &self.streams, self.tracing_on);
            self.sent.insert(plan.step_id, Sent { _span: span, at: now, has_work: !plan.items.is_empty() });
            let Some(p) = &self.conn.pipeline else { return };
            if let Err(status) = p.send(step).await {
                self.pipeline_failed(status);
                return;
            }
            self.steps_sent += 1;
            if self.panic_after_steps.is_some_and(|n| self.steps_sent >= n) {
                panic!("fault injection: MLASERVE_FAULT_SCHEDULER_PANIC_AFTER_STEPS reached");
            }
        }
    }

    fn on_result(&mut self, r: StepResult) {
        let Some(items) = self.planner.step_done(r.step_id) else {
            tracing::warn!(step = r.step_id, "result for an unknown step");
            return;
        };
        if let Some(sent) = self.sent.remove(&r.step_id) {
            if sent.has_work {
                self.metrics.step_duration.record(sent.at.elapsed().as_secs_f64(), &self.metrics.base);
            }
        }
        if let Some(err) = r.error {
            let status = Status::new(Code::from_i32(err.code), format!("step failed: {}", err.message));
            tracing::warn!(step = r.step_id, "{}", status.message());
            for it in items {
                if self.planner.contains(it.id) {
                    self.drop_seq(it.id, status.clone());
                }
            }
            return;
        }
        let mut sampled: HashMap<SeqId, Vec<&SampledToken>> = HashMap::new();
        for t in &r.tokens {
            sampled.entry(t.seq_id).or_default().push(t);
        }
        let drafts: HashMap<SeqId, u32> = r.drafts.iter().map(|d| (d.seq_id, d.token_id)).collect();
        let now = Instant::now();
        for it in items {
            if !self.planner.contains(it.id) {
                continue; // removed while in flight
            }
            if let Some(status) = self.streams.get(&it.id).and_then(|s| s.gone(now)) {
                self.drop_seq(it.id, status);
                continue;
            }
            if !it.sample {
                self.planner.prefilled(it.id, it.tokens);
                continue;
            }
            let Some(toks) = sampled.get(&it.id) else {
                self.drop_seq(it.id, Status::internal("the last stage returned no token for a sequence"));
                continue;
            };
            let Some(stream) = self.streams.get_mut(&it.id) else {
                self.planner.remove(it.id);
                continue;
            };
            let all = self.planner.tokens(it.id).expect("known");
            let cx = EmitContext {
                tok: &self.tok,
                metrics: &self.metrics,
                max_total_tokens: self.max_total_tokens,
                prompt_len: self.planner.prompt_len(it.id).expect("known"),
                len_before: all.len(),
                cached_prompt: self.planner.cached_prompt(it.id),
            };
            let emitted = stream.emit(&cx, toks, now);
            let draft_accepted = it.verify.then_some(toks.len() == 2);
            if let Some(accepted) = draft_accepted {
                self.metrics.drafts.add(1, &self.metrics.base);
                if accepted {
                    self.metrics.drafts_accepted.add(1, &self.metrics.base);
                }
            }
            let outcome = SampleOutcome {
                tokens: emitted.tokens,
                draft_accepted,
                next_draft: drafts.get(&it.id).copied(),
                finished: emitted.finished,
            };
            self.planner.sampled(it.id, outcome);
            if emitted.finished {
                self.streams.remove(&it.id);
            }
        }
    }

    fn pipeline_failed(&mut self, status: Status) {
        self.conn.failed(&status);
        self.sent.clear();
        let status = Status::unavailable(format!("the model pipeline failed: {}", status.message()));
        for id in self.planner.reset(0, 1) {
            if let Some(mut s) = self.streams.remove(&id) {
                self.dequeued(&mut s);
                s.fail(status.clone());
            }
        }
    }

    fn on_connected(&mut self, stages: Vec<StageEndpoint>, geometry: CacheGeometry, pipeline: Pipeline) {
        tracing::info!(
            stages = stages.len(),
            blocks = geometry.num_blocks,
            block_size = geometry.block_size,
            "pipeline connected"
        );
        self.mtp_available = stages.last().is_some_and(|s| s.info.has_mtp);
        if self.opts.speculative && !self.mtp_available {
            tracing::warn!("speculative decoding asked for, but the last stage holds no MTP module");
        }
        let cfg = planner_config(&self.opts, stages.len(), self.mtp_available);
        self.planner.set_config(cfg);
        let stale = self.planner.reset(geometry.num_blocks, geometry.block_size);
        debug_assert!(stale.is_empty(), "a lost pipeline ended every sequence");
        self.sent.clear();
        self.max_total_tokens = self.base_max_total.min(geometry.num_blocks * geometry.block_size);
        self.max_total_shared.store(self.max_total_tokens, Ordering::SeqCst);
        self.conn.connected(stages, geometry, pipeline);
    }
}

/// The planner's limits from the router's options, for a pipeline of `stages` stages.
fn planner_config(opts: &RouterOptions, stages: usize, mtp_available: bool) -> PlannerConfig {
    PlannerConfig {
        max_batch_tokens: opts.max_batch_tokens.max(1),
        max_running: opts.max_running,
        max_in_flight: match opts.max_steps_in_flight {
            0 => stages.max(1),
            n => n,
        },
        admission_watermark_blocks: opts.admission_watermark_blocks,
        prefix_caching: opts.prefix_caching,
        speculation: opts.speculative && mtp_available,
        speculative_min_acceptance: opts.speculative_min_acceptance,
        speculation_probation: SPECULATION_PROBATION,
    }
}
