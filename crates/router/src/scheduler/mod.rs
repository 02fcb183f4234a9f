//! Continuous batching over the pipeline.
//!
//! One task owns every sequence: the step planner (`mlaserve_core::sched`: admission, budgets,
//! block growth, preemption, prefix matching, speculation), the streams (`emitter`: tokens to text,
//! stop strings, finish rules, usage, metrics) and the pipeline connection (`connection`). Up to one
//! step per pipeline stage is in flight, so all stages work at once on different micro-batches.
//!
//! A supervisor watches the task: should it ever stop, health turns NOT_SERVING, new requests are
//! refused, and [`SchedulerHandle::died`] resolves so that the router exits (and is restarted)
//! rather than reporting SERVING while refusing everything.

mod connection;
mod emitter;
mod task;
mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mlaserve_core::ModelConfig;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use mlaserve_telemetry::genai::RouterMetrics;

pub use connection::StageHealth;
pub use emitter::ResponseTx;

use crate::options::RouterOptions;
use crate::pipeline::CacheGeometry;
use crate::request::ValidRequest;
use crate::tokenizer::TokenizerInfo;

enum Command {
    Submit(Box<ValidRequest>, ResponseTx, tracing::Span),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// Live state for ModelInfo and metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub healthy: bool,
    pub last_error: Option<String>,
    /// Every configured stage, in layer order, with its own state.
    pub stages: Vec<StageHealth>,
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
    health: watch::Receiver<bool>,
    /// Set (with the reason) once the scheduler task has stopped.
    died: watch::Receiver<Option<String>>,
    max_total_tokens: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    last_error: Arc<Mutex<Option<String>>>,
    max_queue: usize,
}

impl SchedulerHandle {
    /// Queues a request; its responses arrive on `tx`.
    /// `span` is the request's span: the scheduler keeps it open until the request ends.
    pub fn submit(&self, req: ValidRequest, tx: ResponseTx, span: tracing::Span) -> Result<(), Status> {
        if let Some(why) = self.died.borrow().clone() {
            return Err(Status::unavailable(format!("the router's scheduler stopped ({why}); it restarts")));
        }
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
            return Snapshot { last_error: self.died.borrow().clone(), ..Default::default() };
        }
        rx.await.unwrap_or_default()
    }

    pub fn healthy(&self) -> bool {
        *self.health.borrow()
    }

    /// Pipeline health changes (true = connected and the scheduler alive).
    pub fn health_changes(&self) -> watch::Receiver<bool> {
        self.health.clone()
    }

    /// Resolves, with the reason, once the scheduler task has stopped for good.
    pub async fn died(&self) -> String {
        let mut d = self.died.clone();
        let why = match d.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "the scheduler supervisor is gone".into(),
        };
        why
    }

    /// Longest sequence (prompt + generated) the connected pipeline can hold.
    pub fn max_total_tokens(&self) -> usize {
        self.max_total_tokens.load(Ordering::SeqCst)
    }
}

/// Starts the scheduler task, which connects to the pipeline in the background, and its supervisor.
pub fn spawn(
    tok: Arc<TokenizerInfo>,
    config: ModelConfig,
    opts: RouterOptions,
    metrics: RouterMetrics,
    tracing_on: bool,
) -> SchedulerHandle {
    let (cmd_tx, cmd_rx) = mpsc::channel(opts.max_queue.max(16) * 2);
    let (events_tx, events_rx) = mpsc::channel(256);
    let (connected_tx, connected_rx) = mpsc::channel(4);
    let (health_tx, health_rx) = watch::channel(false);
    let (died_tx, died_rx) = watch::channel(None);
    let health_tx = Arc::new(health_tx);
    let handle = SchedulerHandle {
        tx: cmd_tx,
        health: health_rx,
        died: died_rx,
        max_total_tokens: Arc::new(AtomicUsize::new(config.max_position_embeddings)),
        queued: Arc::new(AtomicUsize::new(0)),
        last_error: Arc::new(Mutex::new(Some("connecting to the pipeline".into()))),
        max_queue: opts.max_queue,
    };
    let shared = connection::Shared {
        health_tx: health_tx.clone(),
        last_error: handle.last_error.clone(),
        stage_health: Arc::new(Mutex::new(vec![])),
    };
    let conn = connection::Connection::new(
        opts.stages.clone(),
        config.clone(),
        opts.stage_tls.clone(),
        opts.reconnect_interval,
        shared,
        events_tx,
        connected_tx,
    );
    let s = task::Scheduler::new(
        tok,
        &config,
        opts,
        conn,
        handle.max_total_tokens.clone(),
        handle.queued.clone(),
        metrics,
        tracing_on,
    );
    let task = tokio::spawn(s.run(cmd_rx, events_rx, connected_rx));
    let last_error = handle.last_error.clone();
    tokio::spawn(async move {
        let why = match task.await {
            Ok(()) => "it stopped".to_string(),
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                format!("it panicked: {msg}")
            }
            Err(e) => format!("it was cancelled: {e}"),
        };
        tracing::error!("the scheduler task ended: {why}");
        if let Ok(mut e) = last_error.lock() {
            *e = Some(format!("the scheduler task ended: {why}"));
        }
        let _ = health_tx.send(false);
        let _ = died_tx.send(Some(why));
    });
    handle
}
