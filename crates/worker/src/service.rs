//! The `mlaserve.internal.v1.Stage` service: sessions, step streams and forwarding to the next stage.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mlaserve_proto::internal::v1::stage_server::Stage;
use mlaserve_proto::internal::v1::{
    stage_message, Connect, Hop, InfoRequest, StageInfo, StageMessage, StageTiming, Step, StepError,
    StepResult,
};
use mlaserve_proto::transport::{connect, stage_client, ClientTls};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use mlaserve_telemetry::genai::StageMetrics;
use mlaserve_telemetry::propagation;
use tracing::Instrument;

use crate::compute::{Compute, StepOutput};
use crate::error::StageError;

/// Static facts about the loaded stage, set once loading finishes.
#[derive(Clone, Debug)]
pub struct StageFacts {
    pub info: StageInfo,
}

pub struct StageService {
    loaded: Arc<OnceLock<(Compute, StageFacts)>>,
    metrics: Option<StageMetrics>,
    downstream_tls: ClientTls,
    session: Arc<AtomicU64>,
    connect_timeout: Duration,
}

/// Messages buffered per direction; bounds memory when a neighbour is slow.
const STREAM_BUFFER: usize = 64;

impl StageService {
    pub fn new(
        loaded: Arc<OnceLock<(Compute, StageFacts)>>,
        metrics: Option<StageMetrics>,
        downstream_tls: ClientTls,
    ) -> Self {
        StageService {
            loaded,
            metrics,
            downstream_tls,
            session: Arc::new(AtomicU64::new(0)),
            connect_timeout: Duration::from_secs(10),
        }
    }

    fn ready(&self) -> Result<&(Compute, StageFacts), Status> {
        self.loaded.get().ok_or_else(|| Status::unavailable("stage is still loading its model"))
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<StepResult, Status>> + Send>>;

fn step_error(step_id: u64, e: StepError) -> StepResult {
    StepResult { step_id, error: Some(e), ..Default::default() }
}

fn wire_error(e: StageError) -> StepError {
    StepError { code: e.code as i32, message: e.message }
}

/// Opens the Run stream to the next stage and sends its Connect.
async fn connect_downstream(
    hop: &Hop,
    rest: &[Hop],
    session_id: &str,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<(mpsc::Sender<StageMessage>, Streaming<StepResult>), Status> {
    let addr = hop.address.as_str();
    let channel = connect(addr, tls, timeout)
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach next stage {addr}: {}", e.message())))?;
    let mut client = stage_client(channel, tls)?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tx.send(StageMessage {
        msg: Some(stage_message::Msg::Connect(Connect {
            downstream: rest.to_vec(),
            session_id: session_id.to_string(),
            expect_layer_start: hop.layer_start,
            expect_layer_end: hop.layer_end,
        })),
    })
    .await
    .map_err(|_| Status::internal("downstream channel closed"))?;
    let results = client
        .run(ReceiverStream::new(rx))
        .await
        .map_err(|e| Status::unavailable(format!("next stage {addr}: {}", e.message())))?
        .into_inner();
    Ok((tx, results))
}

#[tonic::async_trait]
impl Stage for StageService {
    type RunStream = ResultStream;

    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<StageInfo>, Status> {
        let (compute, facts) = self.ready()?;
        let mut info = facts.info.clone();
        info.active_sequences = compute.active_sequences().await as u32;
        Ok(Response::new(info))
    }

    async fn run(&self, req: Request<Streaming<StageMessage>>) -> Result<Response<Self::RunStream>, Status> {
        let (compute, facts) = self.ready()?.clone();
        let mut inbound = req.into_inner();
        let connect = match inbound.message().await? {
            Some(StageMessage { msg: Some(stage_message::Msg::Connect(c)) }) => c,
            _ => return Err(Status::invalid_argument("the first message of a Run stream must be `connect`")),
        };
        let info = &facts.info;
        if (connect.expect_layer_start, connect.expect_layer_end) != (info.layer_start, info.layer_end) {
            return Err(Status::failed_precondition(format!(
                "this stage holds layers {}..{}, the caller expects {}..{}",
                info.layer_start, info.layer_end, connect.expect_layer_start, connect.expect_layer_end
            )));
        }
        if info.last != connect.downstream.is_empty() {
            return Err(Status::failed_precondition(if info.last {
                "this stage holds the last layer but was given downstream stages".to_string()
            } else {
                format!("this stage ends at layer {} but no next stage was given", info.layer_end)
            }));
        }
        // A new session replaces any earlier one: its sequences are gone.
        let session = self.session.fetch_add(1, Ordering::SeqCst) + 1;
        compute.reset().await;
        tracing::info!(session_id = %connect.session_id, downstream = ?connect.downstream, "stage session started");

        let (up_tx, up_rx) = mpsc::channel::<Result<StepResult, Status>>(STREAM_BUFFER);
        let downstream = match connect.downstream.split_first() {
            Some((next, rest)) => Some(
                connect_downstream(
                    next,
                    rest,
                    &connect.session_id,
                    &self.downstream_tls,
                    self.connect_timeout,
                )
                .await?,
            ),
            None => None,
        };
        let layers = (info.layer_start, info.layer_end);
        let down_tx = match downstream {
            Some((down_tx, mut results)) => {
                let next = connect.downstream[0].address.clone();
                let up = up_tx.clone();
                // Relay results from the next stage upward; a broken next stage ends this session.
                tokio::spawn(async move {
                    loop {
                        match results.next().await {
                            Some(Ok(r)) => {
                                if up.send(Ok(r)).await.is_err() {
                                    break;
                                }
                            }
                            Some(Err(e)) => {
                                let _ = up
                                    .send(Err(Status::unavailable(format!(
                                        "stage {next} failed: {}",
                                        e.message()
                                    ))))
                                    .await;
                                break;
                            }
                            None => {
                                let _ = up
                                    .send(Err(Status::unavailable(format!("stage {next} closed its stream"))))
                                    .await;
                                break;
                            }
                        }
                    }
                });
                Some(down_tx)
            }
            None => None,
        };

        let session_counter = self.session.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!("upstream stream ended: {}", e.message());
                        break;
                    }
                };
                if session_counter.load(Ordering::SeqCst) != session {
                    let _ = up_tx.send(Err(Status::aborted("replaced by a newer session"))).await;
                    break;
                }
                let Some(stage_message::Msg::Step(step)) = msg.msg else {
                    let _ =
                        up_tx.send(Err(Status::invalid_argument("`connect` may only be sent once"))).await;
                    break;
                };
                if !process_step(&compute, step, layers, down_tx.as_ref(), &up_tx, metrics.as_ref()).await {
                    break;
                }
            }
            // Dropping down_tx ends the next stage's session too.
            if session_counter.load(Ordering::SeqCst) == session {
                compute.reset().await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(up_rx))))
    }
}

/// Computes one step and passes it on (or answers, on the last stage). Returns false when the
/// session cannot continue.
async fn process_step(
    compute: &Compute,
    step: Step,
    layers: (u32, u32),
    down_tx: Option<&mpsc::Sender<StageMessage>>,
    up_tx: &mpsc::Sender<Result<StepResult, Status>>,
    metrics: Option<&StageMetrics>,
) -> bool {
    let step_id = step.step_id;
    let tokens = step.seqs.iter().map(|s| s.token_ids.len()).sum::<usize>();
    if step.seqs.is_empty() {
        // Housekeeping (releases only): nothing to trace.
        return forward_or_answer(compute, step, layers, down_tx, up_tx, None, 0).await;
    }
    // A span per stage forward, parented to the router's step span (trace context in the message).
    let span = tracing::info_span!(
        "stage_forward",
        "otel.name" = format!("stage_forward {}..{}", layers.0, layers.1),
        step_id,
        layer_start = layers.0,
        layer_end = layers.1,
        batch_size = step.seqs.len(),
        tokens,
        trace_id = tracing::field::Empty,
    );
    propagation::set_remote_parent(&span, propagation::extract_map(&step.trace_context));
    propagation::record_trace_id(&span);
    forward_or_answer(compute, step, layers, down_tx, up_tx, metrics, tokens as u64).instrument(span).await
}

async fn forward_or_answer(
    compute: &Compute,
    mut step: Step,
    layers: (u32, u32),
    down_tx: Option<&mpsc::Sender<StageMessage>>,
    up_tx: &mpsc::Sender<Result<StepResult, Status>>,
    metrics: Option<&StageMetrics>,
    tokens: u64,
) -> bool {
    let step_id = step.step_id;
    if let Some(err) = step.failed.clone() {
        // An earlier stage failed this step: only forget what it lists, then pass the failure on.
        let release = Step { step_id, release: step.release.clone(), ..Default::default() };
        if let Err(e) = compute.step(release).await {
            tracing::warn!(step_id, "release of a failed step: {e}");
        }
        return match down_tx {
            Some(down) => down.send(StageMessage { msg: Some(stage_message::Msg::Step(step)) }).await.is_ok(),
            None => up_tx.send(Ok(step_error(step_id, err))).await.is_ok(),
        };
    }
    let input = std::mem::take(&mut step.hidden);
    let mut to_run = step.clone();
    to_run.hidden = input;
    let done = compute.step(to_run).await;
    let done = match done {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(step_id, "step failed: {e}");
            let err = wire_error(e);
            let Some(down) = down_tx else { return up_tx.send(Ok(step_error(step_id, err))).await.is_ok() };
            // Later stages still get the release list (and forget this step's sequences), and the
            // last one answers with the error: no stage keeps a sequence the router dropped.
            let mut release = std::mem::take(&mut step.release);
            release.extend(step.seqs.iter().map(|w| w.seq_id));
            let failed = Step {
                step_id,
                release,
                failed: Some(err),
                trace_context: step.trace_context,
                ..Default::default()
            };
            return down.send(StageMessage { msg: Some(stage_message::Msg::Step(failed)) }).await.is_ok();
        }
    };
    let timing = StageTiming {
        layer_start: layers.0,
        layer_end: layers.1,
        compute_seconds: done.compute_seconds,
        hidden_bytes_sent: match &done.output {
            StepOutput::Hidden(h) => h.data.len() as u64,
            _ => 0,
        },
    };
    if let Some(m) = metrics {
        if tokens > 0 {
            m.forward_duration.record(done.compute_seconds, &m.base);
            m.tokens.add(tokens, &m.base);
        }
        if timing.hidden_bytes_sent > 0 {
            m.hidden_bytes.add(timing.hidden_bytes_sent, &m.base);
        }
    }
    // What crosses the wire to the next stage: the step (ids, positions, block tables) and hidden states.
    let forward = |step: Step| {
        let msg = StageMessage { msg: Some(stage_message::Msg::Step(step)) };
        if let Some(m) = metrics {
            m.sent_bytes.add(msg.encoded_len() as u64, &m.base);
        }
        msg
    };
    match (done.output, down_tx) {
        (StepOutput::Hidden(h), Some(down)) => {
            step.hidden = Some(h);
            down.send(forward(step)).await.is_ok()
        }
        (StepOutput::Empty, Some(down)) => down.send(forward(step)).await.is_ok(),
        (StepOutput::Tokens(out), None) => up_tx
            .send(Ok(StepResult {
                step_id,
                tokens: out.tokens,
                drafts: out.drafts,
                error: None,
                timings: vec![timing],
            }))
            .await
            .is_ok(),
        (StepOutput::Empty, None) => {
            up_tx.send(Ok(StepResult { step_id, timings: vec![timing], ..Default::default() })).await.is_ok()
        }
        _ => up_tx
            .send(Ok(step_error(
                step_id,
                wire_error(StageError::internal("stage output does not match its position")),
            )))
            .await
            .is_ok(),
    }
}
