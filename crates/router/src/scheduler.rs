//! Continuous batching over the pipeline.
//!
//! One task owns every sequence and the paged block allocator. Each step mixes the decodes of running
//! sequences (one token each, oldest first) with prefill chunks (continuing ones, then new arrivals in
//! FIFO order) under a token budget; up to one step per pipeline stage is in flight, so all stages
//! work at once on different micro-batches. When a decode needs a block and none is free, the newest
//! running sequence is preempted: its blocks are released and it is later recomputed from its tokens.
//! Finished, cancelled and expired sequences leave at the next step and the stages are told to forget
//! them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlaserve_core::blocks::blocks_for;
use mlaserve_core::{BlockAllocator, ModelConfig};
use mlaserve_proto::internal::v1::{SamplingSettings, SeqWork, SequenceSetup, Step, StepResult};
use mlaserve_proto::v1::{FinishReason, GenerateResponse, TokenLogprob, TopLogprob, Usage};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use mlaserve_telemetry::genai::{self, RouterMetrics};
use mlaserve_telemetry::propagation;
use opentelemetry::KeyValue;

use crate::detokenize::IncrementalDetokenizer;
use crate::options::{RouterOptions, SPECULATION_PROBATION};
use crate::pipeline::{discover, CacheGeometry, Pipeline, PipelineEvent, StageEndpoint};
use crate::request::ValidRequest;
use crate::stop::StopMatcher;
use crate::tokenizer::TokenizerInfo;

pub type ResponseTx = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

enum Command {
    Submit(Box<ValidRequest>, ResponseTx, tracing::Span),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// Live state for ModelInfo and metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub healthy: bool,
    pub last_error: Option<String>,
    pub stages: Vec<StageEndpoint>,
    pub geometry: Option<CacheGeometry>,
    pub blocks_free: usize,
    pub running: usize,
    pub waiting: usize,
    pub steps_in_flight: usize,
    pub preemptions: u64,
    pub prefix: mlaserve_core::blocks::PrefixStats,
    pub cached_blocks: usize,
    pub speculative: bool,
    pub drafts_proposed: u64,
    pub drafts_accepted: u64,
}

/// Cheap handle used by the gRPC service.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    health: tokio::sync::watch::Receiver<bool>,
    max_total_tokens: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    last_error: Arc<Mutex<Option<String>>>,
    max_queue: usize,
}

impl SchedulerHandle {
    /// Queues a request; its responses arrive on `tx`.
    /// `span` is the request's span: the scheduler keeps it open until the request ends.
    pub fn submit(&self, req: ValidRequest, tx: ResponseTx, span: tracing::Span) -> Result<(), Status> {
        if !*self.health.borrow() {
            let why = self.last_error.lock().map(|e| e.clone()).unwrap_or_default();
            return Err(Status::unavailable(format!(
                "the model pipeline is not available{}",
                why.map(|w| format!(": {w}")).unwrap_or_default()
            )));
        }
        let prev = self.queued.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::resource_exhausted(format!(
                "the request queue is full ({} waiting); retry later",
                self.max_queue
            )));
        }
        self.tx.try_send(Command::Submit(Box::new(req), tx, span)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            Status::resource_exhausted("the scheduler is saturated; retry later")
        })
    }

    pub async fn snapshot(&self) -> Snapshot {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Snapshot(tx)).await.is_err() {
            return Snapshot::default();
        }
        rx.await.unwrap_or_default()
    }

    pub fn healthy(&self) -> bool {
        *self.health.borrow()
    }

    /// Pipeline health changes (true = connected).
    pub fn health_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.clone()
    }

    /// Longest sequence (prompt + generated) the connected pipeline can hold.
    pub fn max_total_tokens(&self) -> usize {
        self.max_total_tokens.load(Ordering::SeqCst)
    }
}

struct Seq {
    id: u64,
    req: ValidRequest,
    tx: ResponseTx,
    tokens: Vec<u32>,
    prompt_len: usize,
    cached: usize,
    table: Vec<u32>,
    /// Blocks of `table` the stages have been sent.
    sent_blocks: usize,
    /// The stages hold this sequence's setup.
    registered: bool,
    in_flight: bool,
    /// Counted against the queue limit until first admitted.
    queued: bool,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    /// The request's span, and its queue-wait child while waiting for admission.
    span: tracing::Span,
    queue_span: Option<tracing::Span>,
    /// Hash chain of the full blocks of `tokens` (prefix caching), and how many of the sequence's
    /// blocks are registered in the allocator.
    block_hashes: Vec<u64>,
    registered_blocks: usize,
    /// Prompt tokens found in the prefix cache at first admission.
    cached_prompt: usize,
    /// Speculative decoding: asked for, and the draft to verify in the next step.
    speculative: bool,
    draft: Option<u32>,
    /// This sequence's drafts verified and accepted, and whether the next step must tell the
    /// stages that it stopped speculating.
    drafts: u32,
    accepted: u32,
    end_speculation: bool,
}

impl Seq {
    /// Extends `block_hashes` over the full blocks of `tokens`.
    fn sync_hashes(&mut self, bs: usize) {
        let full = self.tokens.len() / bs;
        let mut parent = self.block_hashes.last().copied().unwrap_or(0);
        for b in self.block_hashes.len()..full {
            parent = mlaserve_core::blocks::block_hash(parent, &self.tokens[b * bs..(b + 1) * bs]);
            self.block_hashes.push(parent);
        }
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn gone(&self, now: Instant) -> Option<Status> {
        if self.tx.is_closed() {
            return Some(Status::cancelled("client went away"));
        }
        match self.req.deadline {
            Some(d) if now >= d => Some(Status::deadline_exceeded("the request deadline passed")),
            _ => None,
        }
    }
}

struct InFlight {
    /// (sequence, tokens sent, sampled, draft verified)
    seqs: Vec<(u64, usize, bool, bool)>,
    /// The step's span, open until its result arrives.
    _span: tracing::Span,
    sent: Instant,
}

pub struct Scheduler {
    tok: Arc<TokenizerInfo>,
    config: ModelConfig,
    opts: RouterOptions,
    max_total_tokens: usize,
    base_max_total: usize,
    max_total_shared: Arc<AtomicUsize>,
    alloc: BlockAllocator,
    waiting: VecDeque<Seq>,
    running: BTreeMap<u64, Seq>,
    in_flight: HashMap<u64, InFlight>,
    pending_release: Vec<u64>,
    pipeline: Option<Pipeline>,
    stages: Vec<StageEndpoint>,
    geometry: Option<CacheGeometry>,
    epoch: u64,
    next_seq: u64,
    next_step: u64,
    preemptions: u64,
    queued: Arc<AtomicUsize>,
    health_tx: tokio::sync::watch::Sender<bool>,
    last_error: Arc<Mutex<Option<String>>>,
    events_tx: mpsc::Sender<(u64, PipelineEvent)>,
    connected_tx: mpsc::Sender<(u64, Vec<StageEndpoint>, CacheGeometry, Pipeline)>,
    reconnecting: bool,
    metrics: RouterMetrics,
    tracing_on: bool,
    /// The last stage holds an MTP module (speculation possible).
    mtp_available: bool,
    drafts_proposed: u64,
    drafts_accepted: u64,
}

type Connected = (u64, Vec<StageEndpoint>, CacheGeometry, Pipeline);

impl Scheduler {
    /// Starts the scheduler task; it connects to the pipeline in the background.
    pub fn spawn(
        tok: Arc<TokenizerInfo>,
        config: ModelConfig,
        opts: RouterOptions,
        max_total_tokens: usize,
        metrics: RouterMetrics,
        tracing_on: bool,
    ) -> SchedulerHandle {
        let (cmd_tx, cmd_rx) = mpsc::channel(opts.max_queue.max(16) * 2);
        let (events_tx, events_rx) = mpsc::channel(256);
        let (connected_tx, connected_rx) = mpsc::channel(4);
        let (health_tx, health_rx) = tokio::sync::watch::channel(false);
        let handle = SchedulerHandle {
            tx: cmd_tx,
            health: health_rx,
            max_total_tokens: Arc::new(AtomicUsize::new(max_total_tokens)),
            queued: Arc::new(AtomicUsize::new(0)),
            last_error: Arc::new(Mutex::new(Some("connecting to the pipeline".into()))),
            max_queue: opts.max_queue,
        };
        let s = Scheduler {
            tok,
            config,
            max_total_tokens,
            base_max_total: max_total_tokens,
            max_total_shared: handle.max_total_tokens.clone(),
            alloc: BlockAllocator::new(0, 1),
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            in_flight: HashMap::new(),
            pending_release: vec![],
            pipeline: None,
            stages: vec![],
            geometry: None,
            epoch: 0,
            next_seq: 1,
            next_step: 1,
            preemptions: 0,
            queued: handle.queued.clone(),
            health_tx,
            last_error: handle.last_error.clone(),
            events_tx,
            connected_tx,
            reconnecting: false,
            metrics,
            tracing_on,
            mtp_available: false,
            drafts_proposed: 0,
            drafts_accepted: 0,
            opts,
        };
        tokio::spawn(s.run(cmd_rx, events_rx, connected_rx));
        handle
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut events: mpsc::Receiver<(u64, PipelineEvent)>,
        mut connected: mpsc::Receiver<Connected>,
    ) {
        self.start_reconnect();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            self.reap();
            if self.pipeline.is_some() {
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
                    if epoch == self.epoch {
                        match ev {
                            PipelineEvent::Result(r) => self.on_result(r),
                            PipelineEvent::Failed(status) => self.pipeline_failed(status),
                        }
                    }
                }
                Some((epoch, stages, geometry, pipeline)) = connected.recv() => {
                    if epoch == self.epoch {
                        self.on_connected(stages, geometry, pipeline);
                    }
                }
                _ = tick.tick() => {}
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            healthy: self.pipeline.is_some(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            stages: self.stages.clone(),
            geometry: self.geometry,
            blocks_free: self.alloc.num_free(),
            running: self.running.len(),
            waiting: self.waiting.len(),
            steps_in_flight: self.in_flight.len(),
            preemptions: self.preemptions,
            prefix: self.alloc.prefix_stats().clone(),
            cached_blocks: self.alloc.num_cached(),
            speculative: self.opts.speculative && self.mtp_available,
            drafts_proposed: self.drafts_proposed,
            drafts_accepted: self.drafts_accepted,
        }
    }

    fn enqueue(&mut self, req: ValidRequest, tx: ResponseTx, span: tracing::Span) {
        let id = self.next_seq;
        self.next_seq += 1;
        if self.pipeline.is_none() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(Err(Status::unavailable("the model pipeline is not available")));
            return;
        }
        let tail = &req.prompt_ids[req.prompt_ids.len().saturating_sub(8)..];
        let queue_span = tracing::info_span!(parent: &span, "queue");
        let seq = Seq {
            span,
            queue_span: Some(queue_span),
            block_hashes: vec![],
            registered_blocks: 0,
            cached_prompt: 0,
            speculative: self.opts.speculative && !req.sampling.has_penalties(),
            draft: None,
            drafts: 0,
            accepted: 0,
            end_speculation: false,
            id,
            detok: IncrementalDetokenizer::new(tail, true),
            stop: StopMatcher::new(req.stop.clone()),
            tokens: req.prompt_ids.clone(),
            prompt_len: req.prompt_ids.len(),
            cached: 0,
            table: vec![],
            sent_blocks: 0,
            registered: false,
            in_flight: false,
            queued: true,
            first_scheduled: None,
            first_token: None,
            req,
            tx,
        };
        tracing::debug!(seq = id, request_id = %seq.req.request_id, prompt = seq.prompt_len, "queued");
        self.waiting.push_back(seq);
    }

    fn dequeued(&self, seq: &mut Seq) {
        if seq.queued {
            seq.queued = false;
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Removes sequences whose client left or whose deadline passed (those not in flight).
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.waiting.len() {
            if let Some(status) = self.waiting[i].gone(now) {
                let mut seq = self.waiting.remove(i).expect("index in range");
                self.dequeued(&mut seq);
                self.drop_seq(seq, status);
            } else {
                i += 1;
            }
        }
        let gone: Vec<(u64, Status)> = self
            .running
            .values()
            .filter(|s| !s.in_flight)
            .filter_map(|s| s.gone(now).map(|st| (s.id, st)))
            .collect();
        for (id, status) in gone {
            let seq = self.running.remove(&id).expect("present");
            self.drop_seq(seq, status);
        }
    }

    /// Ends a sequence with `status` (sent if the client still listens) and frees its blocks.
    fn drop_seq(&mut self, seq: Seq, status: Status) {
        seq.span.record("otel.status_code", "ERROR");
        seq.span.record("error.type", format!("{:?}", status.code()));
        if status.code() != Code::Cancelled {
            let _ = seq.tx.send(Err(status.clone()));
        }
        tracing::debug!(seq = seq.id, request_id = %seq.req.request_id, "dropped: {}", status.message());
        self.free(seq);
    }

    fn free(&mut self, seq: Seq) {
        if !seq.table.is_empty() {
            if let Err(e) = self.alloc.release(&seq.table) {
                tracing::error!(seq = seq.id, "block release failed: {e}");
            }
        }
        if seq.registered {
            self.pending_release.push(seq.id);
        }
    }

    fn record_gauges(&self) {
        let m = &self.metrics;
        m.running.record(self.running.len() as u64, &m.base);
        m.waiting.record(self.waiting.len() as u64, &m.base);
        m.blocks_used.record(self.alloc.num_used() as u64, &m.base);
        m.blocks_free.record(self.alloc.num_free() as u64, &m.base);
    }

    fn max_in_flight(&self) -> usize {
        match self.opts.max_steps_in_flight {
            0 => self.stages.len().max(1),
            n => n,
        }
    }

    /// Sends steps until every pipeline slot is busy or nothing is ready.
    async fn fill(&mut self) {
        while self.in_flight.len() < self.max_in_flight() {
            let Some((step, inflight)) = self.build_step() else { break };
            if !self.send(step, inflight).await {
                return;
            }
        }
        // Idle: still tell the stages about finished sequences.
        if self.in_flight.is_empty() && !self.pending_release.is_empty() {
            let step = Step {
                step_id: self.take_step_id(),
                release: std::mem::take(&mut self.pending_release),
                ..Default::default()
            };
            self.send(step, InFlight { seqs: vec![], _span: tracing::Span::none(), sent: Instant::now() })
                .await;
        }
    }

    fn take_step_id(&mut self) -> u64 {
        let id = self.next_step;
        self.next_step += 1;
        id
    }

    async fn send(&mut self, step: Step, inflight: InFlight) -> bool {
        let id = step.step_id;
        let Some(p) = &self.pipeline else { return false };
        self.in_flight.insert(id, inflight);
        if let Err(status) = p.send(step).await {
            self.pipeline_failed(status);
            return false;
        }
        true
    }

    /// Makes room for `seq` to hold `tokens` slots, preempting the newest other running sequences
    /// that are not in flight or already in this step.
    fn grow(&mut self, id: u64, tokens: usize, busy: &HashSet<u64>) -> bool {
        loop {
            let seq = self.running.get_mut(&id).expect("running");
            let mut table = std::mem::take(&mut seq.table);
            let ok = self.alloc.ensure_capacity(&mut table, tokens).is_ok();
            self.running.get_mut(&id).expect("running").table = table;
            if ok {
                return true;
            }
            let victim = self
                .running
                .iter()
                .rev()
                .find(|(&vid, v)| vid != id && !v.in_flight && !busy.contains(&vid))
                .map(|(&vid, _)| vid);
            let Some(vid) = victim else { return false };
            self.preempt(vid);
        }
    }

    /// Gives back the blocks a not-yet-running sequence took (it stays queued).
    fn release_table(&mut self, seq: &mut Seq) {
        if let Err(e) = self.alloc.release(&seq.table) {
            tracing::error!(seq = seq.id, "block release failed: {e}");
        }
        seq.table.clear();
        seq.cached = 0;
        seq.registered_blocks = 0;
    }

    /// Registers the sequence's newly completed full blocks for prefix reuse.
    fn register_blocks(&mut self, id: u64) {
        if !self.opts.prefix_caching {
            return;
        }
        let bs = self.alloc.block_size();
        let seq = self.running.get_mut(&id).expect("running");
        let full = seq.cached / bs;
        if full > seq.registered_blocks {
            seq.sync_hashes(bs);
            self.alloc.register(
                &seq.block_hashes[seq.registered_blocks..full],
                &seq.table[seq.registered_blocks..full],
            );
            seq.registered_blocks = full;
        }
    }

    fn preempt(&mut self, id: u64) {
        let mut seq = self.running.remove(&id).expect("running");
        tracing::info!(seq = id, tokens = seq.tokens.len(), "preempting (will recompute)");
        self.preemptions += 1;
        self.metrics.preemptions.add(1, &self.metrics.base);
        let table = std::mem::take(&mut seq.table);
        if let Err(e) = self.alloc.release(&table) {
            tracing::error!(seq = id, "block release failed: {e}");
        }
        if seq.registered {
            self.pending_release.push(id);
        }
        seq.cached = 0;
        seq.sent_blocks = 0;
        seq.registered = false;
        seq.registered_blocks = 0;
        seq.draft = None;
        self.waiting.push_front(seq);
    }

    fn build_step(&mut self) -> Option<(Step, InFlight)> {
        let mut budget = self.opts.max_batch_tokens.max(1);
        let slots = self.max_in_flight().saturating_sub(self.in_flight.len()).max(1);
        let ready: Vec<u64> = self
            .running
            .values()
            .filter(|s| !s.in_flight && s.cached + 1 == s.tokens.len())
            .map(|s| s.id)
            .collect();
        // Spread decodes over the free pipeline slots so every stage gets a micro-batch.
        let decode_cap = ready.len().div_ceil(slots);
        let mut work: Vec<(u64, usize)> = Vec::new();
        let mut busy: HashSet<u64> = HashSet::new();
        for id in ready {
            if work.len() >= decode_cap || budget == 0 {
                break;
            }
            if !self.running.contains_key(&id) {
                continue; // preempted while making room for an earlier one
            }
            // With a draft, the step feeds [last token, draft] and verifies it; only when two more
            // tokens are wanted and fit.
            let s = &self.running[&id];
            let room = s
                .req
                .max_new_tokens
                .saturating_sub(s.generated())
                .min(self.max_total_tokens - s.tokens.len());
            let verify = s.draft.is_some() && room >= 2 && budget >= 2 && self.mtp_available;
            let n = if verify { 2 } else { 1 };
            let need = s.cached + n;
            if self.grow(id, need, &busy) {
                work.push((id, n));
                busy.insert(id);
                budget -= n;
            }
        }
        // Continue partial prefills.
        let partial: Vec<u64> = self
            .running
            .values()
            .filter(|s| !s.in_flight && !busy.contains(&s.id) && s.tokens.len() - s.cached > 1)
            .map(|s| s.id)
            .collect();
        for id in partial {
            if budget == 0 {
                break;
            }
            let s = &self.running[&id];
            let n = (s.tokens.len() - s.cached).min(budget);
            let cached = s.cached;
            if self.grow(id, cached + n, &busy) {
                work.push((id, n));
                busy.insert(id);
                budget -= n;
            }
        }
        // Admit new sequences in arrival order; none may overtake the head of the queue.
        while budget > 0 && self.running.len() < self.opts.max_running {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            // Cached blocks of the same prefix are taken instead of recomputed (at least the last
            // token is always computed: it yields the logits).
            let bs = self.alloc.block_size();
            if self.opts.prefix_caching && seq.table.is_empty() {
                seq.sync_hashes(bs);
                let shared = self.alloc.match_prefix(&seq.block_hashes, (seq.tokens.len() - 1) / bs);
                seq.cached = shared.len() * bs;
                seq.registered_blocks = shared.len();
                seq.table = shared;
                if seq.first_scheduled.is_none() {
                    seq.cached_prompt = seq.cached;
                }
            }
            let n = (seq.tokens.len() - seq.cached).min(budget);
            let need = blocks_for(seq.cached + n, bs).saturating_sub(seq.table.len());
            let free = self.alloc.num_free();
            if free < need + self.opts.admission_watermark_blocks.min(free)
                || self.alloc.ensure_capacity(&mut seq.table, seq.cached + n).is_err()
            {
                self.release_table(&mut seq);
                self.waiting.push_front(seq);
                break;
            }
            self.dequeued(&mut seq);
            if seq.first_scheduled.is_none() {
                let now = Instant::now();
                seq.first_scheduled = Some(now);
                self.metrics
                    .queue_duration
                    .record(now.duration_since(seq.req.arrival).as_secs_f64(), &self.metrics.base);
                self.metrics.prompt_tokens.add(seq.prompt_len as u64, &self.metrics.base);
            }
            seq.queue_span = None;
            work.push((seq.id, n));
            busy.insert(seq.id);
            budget -= n;
            self.running.insert(seq.id, seq);
        }
        if work.is_empty() {
            return None;
        }
        work.sort_unstable();
        let step_id = self.take_step_id();
        let tokens: usize = work.iter().map(|w| w.1).sum();
        // One span per step, in the trace of its oldest request and linked to the others'.
        let span = tracing::info_span!(
            parent: None,
            "step",
            step_id,
            batch_size = work.len(),
            tokens,
            "otel.kind" = "internal"
        );
        let trace_context = if self.tracing_on {
            let ctxs: Vec<_> =
                work.iter().map(|w| propagation::span_context(&self.running[&w.0].span)).collect();
            if let Some(first) = ctxs.first() {
                propagation::set_parent_span(&span, first);
            }
            propagation::add_links(&span, &ctxs[1..]);
            propagation::inject_span(&span)
        } else {
            Default::default()
        };
        let mut seqs = Vec::with_capacity(work.len());
        let mut inflight =
            InFlight { seqs: Vec::with_capacity(work.len()), _span: span, sent: Instant::now() };
        for (id, n) in work {
            let s = self.running.get_mut(&id).expect("running");
            // A decode of two tokens is a verification: the last token and the draft.
            let verify = s.cached + 1 == s.tokens.len() && n == 2;
            let sample = verify || s.cached + n == s.tokens.len();
            let token_ids = if verify {
                vec![s.tokens[s.cached], s.draft.take().expect("verification has a draft")]
            } else {
                s.draft = None;
                s.tokens[s.cached..s.cached + n].to_vec()
            };
            let setup = (!s.registered).then_some(SequenceSetup {
                sampling: Some(SamplingSettings {
                    temperature: s.req.sampling.temperature,
                    top_k: s.req.sampling.top_k,
                    top_p: s.req.sampling.top_p,
                    min_p: s.req.sampling.min_p,
                    repetition_penalty: s.req.sampling.repetition_penalty,
                    frequency_penalty: s.req.sampling.frequency_penalty,
                    presence_penalty: s.req.sampling.presence_penalty,
                    seed: s.req.sampling.seed,
                    logprobs: s.req.sampling.logprobs,
                    top_logprobs: s.req.sampling.top_logprobs,
                }),
                pos_offset: 0,
                prompt_len: s.prompt_len as u32,
                // Penalties need the tokens a prefix-cache hit skipped.
                cached_tokens: if s.req.sampling.has_penalties() {
                    s.tokens[..s.cached].to_vec()
                } else {
                    vec![]
                },
                speculative: s.speculative && self.mtp_available,
            });
            seqs.push(SeqWork {
                seq_id: id,
                cached: s.cached as u32,
                token_ids,
                new_blocks: s.table[s.sent_blocks..].to_vec(),
                sample,
                setup,
                verify_draft: verify,
                end_speculation: std::mem::take(&mut s.end_speculation),
            });
            s.sent_blocks = s.table.len();
            s.registered = true;
            s.in_flight = true;
            inflight.seqs.push((id, n, sample, verify));
        }
        let step = Step {
            step_id,
            release: std::mem::take(&mut self.pending_release),
            seqs,
            hidden: None,
            trace_context,
        };
        Some((step, inflight))
    }

    fn on_result(&mut self, r: StepResult) {
        let Some(step) = self.in_flight.remove(&r.step_id) else {
            tracing::warn!(step = r.step_id, "result for an unknown step");
            return;
        };
        if !step.seqs.is_empty() {
            self.metrics.step_duration.record(step.sent.elapsed().as_secs_f64(), &self.metrics.base);
        }
        self.record_gauges();
        if let Some(err) = r.error {
            let status = Status::new(Code::from_i32(err.code), format!("step failed: {}", err.message));
            tracing::warn!(step = r.step_id, "{}", status.message());
            for (id, ..) in step.seqs {
                if let Some(seq) = self.running.remove(&id) {
                    // The failing stage dropped it; the others still hold it until the release.
                    self.drop_seq(seq, status.clone());
                }
            }
            return;
        }
        let mut sampled: HashMap<u64, Vec<&mlaserve_proto::internal::v1::SampledToken>> = HashMap::new();
        for t in &r.tokens {
            sampled.entry(t.seq_id).or_default().push(t);
        }
        let drafts: HashMap<u64, u32> = r.drafts.iter().map(|d| (d.seq_id, d.token_id)).collect();
        let now = Instant::now();
        for (id, n, sample, verify) in step.seqs {
            let Some(seq) = self.running.get_mut(&id) else { continue };
            seq.in_flight = false;
            if seq.gone(now).is_some() {
                continue; // reaped before the next step
            }
            if !sample {
                seq.cached += n;
                self.register_blocks(id);
                continue;
            }
            let Some(toks) = sampled.get(&id) else {
                let seq = self.running.remove(&id).expect("present");
                self.drop_seq(seq, Status::internal("the last stage returned no token for a sequence"));
                continue;
            };
            if verify {
                self.metrics.drafts.add(1, &self.metrics.base);
                self.drafts_proposed += 1;
                seq.drafts += 1;
                if toks.len() == 2 {
                    self.metrics.drafts_accepted.add(1, &self.metrics.base);
                    self.drafts_accepted += 1;
                    seq.accepted += 1;
                }
                // A draft that is rarely right costs a wider step (and the MTP pass) for little.
                if seq.drafts >= SPECULATION_PROBATION
                    && f64::from(seq.accepted) < self.opts.speculative_min_acceptance * f64::from(seq.drafts)
                {
                    seq.speculative = false;
                    seq.end_speculation = true;
                }
            }
            if self.emit(id, toks, now) {
                let seq = self.running.remove(&id).expect("present");
                self.free(seq);
                continue;
            }
            // Everything but the newest token is cached (a rejected draft's slot is not).
            let seq = self.running.get_mut(&id).expect("present");
            seq.cached = seq.tokens.len() - 1;
            seq.draft = if seq.speculative { drafts.get(&id).copied() } else { None };
            self.register_blocks(id);
        }
    }

    /// Appends a step's sampled tokens (two after an accepted draft) and streams them as one
    /// message; tokens after a finishing one are dropped. Returns whether the sequence is done.
    fn emit(&mut self, id: u64, toks: &[&mlaserve_proto::internal::v1::SampledToken], now: Instant) -> bool {
        let tok = self.tok.clone();
        let max_total = self.max_total_tokens;
        let seq = self.running.get_mut(&id).expect("present");
        if seq.first_token.is_none() {
            seq.first_token = Some(now);
            tracing::info!(parent: &seq.span, "first_token");
        }
        let mut token_ids = Vec::with_capacity(toks.len());
        let mut logprobs = Vec::new();
        let mut text = String::new();
        let mut finish = None;
        let mut stop_reason = String::new();
        for t in toks {
            let token = t.token_id;
            seq.tokens.push(token);
            token_ids.push(token);
            let is_eos = seq.req.eos_token_ids.contains(&token);
            let is_stop_token = seq.req.stop_token_ids.contains(&token);
            if !is_eos && !is_stop_token {
                match seq.detok.push(&tok, token) {
                    Ok(delta) => {
                        let out = seq.stop.push(&delta);
                        text.push_str(&out.emit);
                        if let Some(s) = out.stopped {
                            finish = Some(FinishReason::Stop);
                            stop_reason = s;
                        }
                    }
                    Err(e) => tracing::warn!(seq = id, "detokenisation failed: {e}"),
                }
            }
            if finish.is_none() {
                if is_eos {
                    finish = Some(FinishReason::Eos);
                } else if is_stop_token {
                    finish = Some(FinishReason::Stop);
                    stop_reason = tok.token_text(token);
                } else if seq.generated() >= seq.req.max_new_tokens || seq.tokens.len() >= max_total {
                    finish = Some(FinishReason::Length);
                }
                if finish.is_some() {
                    if let Ok(rest) = seq.detok.finish(&tok) {
                        text.push_str(&seq.stop.push(&rest).emit);
                    }
                    text.push_str(&seq.stop.flush());
                }
            }
            if seq.req.sampling.wants_logprobs() {
                logprobs.push(TokenLogprob {
                    token_id: token,
                    logprob: t.logprob,
                    top: t
                        .top
                        .iter()
                        .map(|x| TopLogprob {
                            token_id: x.token_id,
                            logprob: x.logprob,
                            text: tok.token_text(x.token_id),
                        })
                        .collect(),
                });
            }
            if finish.is_some() {
                break;
            }
        }
        let usage = finish.map(|_| {
            let secs = |t: Option<Instant>| {
                t.map(|t| t.duration_since(seq.req.arrival).as_secs_f64()).unwrap_or(0.0)
            };
            Usage {
                prompt_tokens: seq.prompt_len as u32,
                completion_tokens: seq.generated() as u32,
                cached_prompt_tokens: seq.cached_prompt as u32,
                queue_seconds: secs(seq.first_scheduled),
                time_to_first_token_seconds: secs(seq.first_token),
                total_seconds: now.duration_since(seq.req.arrival).as_secs_f64(),
            }
        });
        self.metrics.generated_tokens.add(token_ids.len() as u64, &self.metrics.base);
        if let Some(reason) = finish {
            let reason_name = match reason {
                FinishReason::Length => "length",
                FinishReason::Stop => "stop",
                FinishReason::Eos => "eos",
                _ => "cancelled",
            };
            let total = now.duration_since(seq.req.arrival).as_secs_f64();
            let ttft =
                seq.first_token.map(|t| t.duration_since(seq.req.arrival).as_secs_f64()).unwrap_or(total);
            let m = &self.metrics;
            m.ttft.record(ttft, &m.base);
            m.request_duration.record(total, &m.base);
            if seq.generated() > 1 {
                m.tpot.record((total - ttft) / (seq.generated() - 1) as f64, &m.base);
            }
            let mut attrs = m.base.clone();
            attrs.push(KeyValue::new("finish_reason", reason_name));
            m.requests.add(1, &attrs);
            seq.span.record(genai::USAGE_INPUT_TOKENS, seq.prompt_len as i64);
            seq.span.record(genai::USAGE_OUTPUT_TOKENS, seq.generated() as i64);
            seq.span.record(genai::RESPONSE_FINISH_REASONS, format!("[\"{reason_name}\"]"));
        }
        let msg = GenerateResponse {
            request_id: seq.req.request_id.clone(),
            token_ids,
            text,
            logprobs,
            finish_reason: finish.unwrap_or(FinishReason::Unspecified) as i32,
            usage,
            stop_reason,
        };
        let delivered = seq.tx.send(Ok(msg)).is_ok();
        finish.is_some() || !delivered
    }

    fn pipeline_failed(&mut self, status: Status) {
        tracing::error!("pipeline failed: {}", status.message());
        self.pipeline = None;
        let _ = self.health_tx.send(false);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(status.message().to_string());
        }
        self.epoch += 1;
        self.in_flight.clear();
        self.pending_release.clear();
        let status = Status::unavailable(format!("the model pipeline failed: {}", status.message()));
        for (_, seq) in std::mem::take(&mut self.running) {
            let _ = seq.tx.send(Err(status.clone()));
        }
        for mut seq in std::mem::take(&mut self.waiting) {
            self.dequeued(&mut seq);
            let _ = seq.tx.send(Err(status.clone()));
        }
        self.alloc = BlockAllocator::new(0, 1);
        self.start_reconnect();
    }

    fn on_connected(&mut self, stages: Vec<StageEndpoint>, geometry: CacheGeometry, pipeline: Pipeline) {
        self.reconnecting = false;
        tracing::info!(
            stages = stages.len(),
            blocks = geometry.num_blocks,
            block_size = geometry.block_size,
            "pipeline connected"
        );
        self.alloc = BlockAllocator::new(geometry.num_blocks, geometry.block_size);
        self.max_total_tokens = self.base_max_total.min(geometry.num_blocks * geometry.block_size);
        self.max_total_shared.store(self.max_total_tokens, Ordering::SeqCst);
        self.mtp_available = stages.last().is_some_and(|s| s.info.has_mtp);
        if self.opts.speculative && !self.mtp_available {
            tracing::warn!("speculative decoding asked for, but the last stage holds no MTP module");
        }
        self.stages = stages;
        self.geometry = Some(geometry);
        self.pipeline = Some(pipeline);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        let _ = self.health_tx.send(true);
    }

    fn start_reconnect(&mut self) {
        if self.reconnecting {
            return;
        }
        self.reconnecting = true;
        let epoch = self.epoch;
        let addrs = self.opts.stages.clone();
        let config = self.config.clone();
        let interval = self.opts.reconnect_interval;
        let events = self.events_tx.clone();
        let connected = self.connected_tx.clone();
        let last_error = self.last_error.clone();
        let tls = self.opts.stage_tls.clone();
        tokio::spawn(async move {
            let timeout = Duration::from_secs(5);
            loop {
                let attempt = async {
                    let (stages, geometry) = discover(&addrs, &config, &tls, timeout).await?;
                    let session = uuid::Uuid::new_v4().to_string();
                    let p = Pipeline::open(&stages, &session, &tls, timeout, events.clone(), epoch).await?;
                    Ok::<_, Status>((stages, geometry, p))
                };
                match attempt.await {
                    Ok((stages, geometry, p)) => {
                        let _ = connected.send((epoch, stages, geometry, p)).await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!("pipeline not ready: {}", e.message());
                        if let Ok(mut le) = last_error.lock() {
                            *le = Some(e.message().to_string());
                        }
                        if connected.is_closed() {
                            return;
                        }
                        tokio::time::sleep(interval).await;
                    }
                }
            }
        });
    }
}
