//! The router's connection to the pipeline: discovers the stages (Info), checks that they hold one
//! model's layers contiguously and agree on the cache geometry, then opens the step stream to the
//! first stage (which chains to the others).

use std::time::Duration;

use mlaserve_core::ModelConfig;
use mlaserve_proto::internal::v1::{
    stage_message, Connect, Hop, InfoRequest, StageInfo, StageMessage, StepResult,
};
use mlaserve_proto::transport::{connect, stage_client, ClientTls};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

/// A stage as discovered.
#[derive(Debug, Clone)]
pub struct StageEndpoint {
    pub address: String,
    pub info: StageInfo,
}

/// The cache geometry every stage shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheGeometry {
    pub num_blocks: usize,
    pub block_size: usize,
}

/// Asks each stage what it holds; one answer (or error) per address, in order.
pub async fn probe(addrs: &[String], tls: &ClientTls, timeout: Duration) -> Vec<Result<StageInfo, Status>> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let info = async {
            let ch = connect(a, tls, timeout).await?;
            stage_client(ch, tls)?
                .info(InfoRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| Status::new(e.code(), format!("stage {a}: {}", e.message())))
        };
        out.push(info.await);
    }
    out
}

/// Asks every stage what it holds and checks that together they serve `config`.
pub async fn discover(
    addrs: &[String],
    config: &ModelConfig,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<(Vec<StageEndpoint>, CacheGeometry), Status> {
    let infos = probe(addrs, tls, timeout).await;
    let stages = addrs
        .iter()
        .zip(infos)
        .map(|(a, i)| i.map(|info| StageEndpoint { address: a.clone(), info }))
        .collect::<Result<Vec<_>, _>>()?;
    check(stages, config)
}

/// Checks that `stages` hold `config`'s layers contiguously and agree on the cache geometry.
pub fn check(
    stages: Vec<StageEndpoint>,
    config: &ModelConfig,
) -> Result<(Vec<StageEndpoint>, CacheGeometry), Status> {
    if stages.is_empty() {
        return Err(Status::failed_precondition("no pipeline stages configured"));
    }
    let n = config.num_hidden_layers as u32;
    let mut expect = 0u32;
    for (i, s) in stages.iter().enumerate() {
        let inf = &s.info;
        if inf.layer_start != expect {
            return Err(Status::failed_precondition(format!(
                "stage {i} ({}) holds layers {}..{}, expected it to start at layer {expect}",
                s.address, inf.layer_start, inf.layer_end
            )));
        }
        if inf.num_hidden_layers != n || inf.hidden_size as usize != config.hidden_size {
            return Err(Status::failed_precondition(format!(
                "stage {i} ({}) serves a different model ({} layers, hidden {}) than the router's ({n}, {})",
                s.address, inf.num_hidden_layers, inf.hidden_size, config.hidden_size
            )));
        }
        expect = inf.layer_end;
    }
    if expect != n {
        return Err(Status::failed_precondition(format!(
            "the stages cover layers 0..{expect}, the model has {n}"
        )));
    }
    let block_size = stages[0].info.block_size as usize;
    if let Some(s) = stages.iter().find(|s| s.info.block_size as usize != block_size) {
        return Err(Status::failed_precondition(format!(
            "stage {} uses cache blocks of {} tokens, stage {} of {block_size}",
            s.address, s.info.block_size, stages[0].address
        )));
    }
    let num_blocks = stages.iter().map(|s| s.info.kv_blocks as usize).min().unwrap_or(0);
    if num_blocks == 0 || block_size == 0 {
        return Err(Status::failed_precondition("the stages have no cache blocks"));
    }
    Ok((stages, CacheGeometry { num_blocks, block_size }))
}

/// The open step stream.
pub struct Pipeline {
    tx: mpsc::Sender<StageMessage>,
}

/// What the pipeline reports back.
#[derive(Debug)]
pub enum PipelineEvent {
    Result(StepResult),
    Failed(Status),
}

impl Pipeline {
    /// Opens the Run stream to the first stage; results and a final failure arrive on `events`.
    pub async fn open(
        stages: &[StageEndpoint],
        session_id: &str,
        tls: &ClientTls,
        timeout: Duration,
        events: mpsc::Sender<(u64, PipelineEvent)>,
        epoch: u64,
    ) -> Result<Pipeline, Status> {
        let first = &stages[0];
        let ch = connect(&first.address, tls, timeout).await?;
        let mut client = stage_client(ch, tls)?;
        let (tx, rx) = mpsc::channel(64);
        tx.send(StageMessage {
            msg: Some(stage_message::Msg::Connect(Connect {
                downstream: stages[1..]
                    .iter()
                    .map(|s| Hop {
                        address: s.address.clone(),
                        layer_start: s.info.layer_start,
                        layer_end: s.info.layer_end,
                    })
                    .collect(),
                session_id: session_id.to_string(),
                expect_layer_start: first.info.layer_start,
                expect_layer_end: first.info.layer_end,
            })),
        })
        .await
        .map_err(|_| Status::internal("pipeline channel closed"))?;
        let mut results = client
            .run(ReceiverStream::new(rx))
            .await
            .map_err(|e| Status::unavailable(format!("stage {}: {}", first.address, e.message())))?
            .into_inner();
        tokio::spawn(async move {
            loop {
                let ev = match results.next().await {
                    Some(Ok(r)) => PipelineEvent::Result(r),
                    Some(Err(e)) => PipelineEvent::Failed(Status::unavailable(format!(
                        "pipeline failed: {}",
                        e.message()
                    ))),
                    None => PipelineEvent::Failed(Status::unavailable("pipeline closed its stream")),
                };
                let last = matches!(ev, PipelineEvent::Failed(_));
                if events.send((epoch, ev)).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Pipeline { tx })
    }

    pub async fn send(&self, step: mlaserve_proto::internal::v1::Step) -> Result<(), Status> {
        self.tx
            .send(StageMessage { msg: Some(stage_message::Msg::Step(step)) })
            .await
            .map_err(|_| Status::unavailable("pipeline stream is closed"))
    }
}
