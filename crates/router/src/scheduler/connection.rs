//! The scheduler's link to the pipeline: connecting and reconnecting in the background, health (the
//! pipeline's and each stage's own), and what a broken pipeline means for the state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlaserve_core::ModelConfig;
use mlaserve_proto::internal::v1::StageInfo;
use mlaserve_proto::transport::ClientTls;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::pipeline::{check, probe, CacheGeometry, Pipeline, PipelineEvent, StageEndpoint};

/// A configured stage as last seen: reachable and serving, or why not.
#[derive(Debug, Clone, Default)]
pub struct StageHealth {
    pub address: String,
    pub info: Option<StageInfo>,
    pub healthy: bool,
    pub error: String,
}

/// A successful (re)connection, tagged with the epoch it was started in.
pub(super) type Connected = (u64, Vec<StageEndpoint>, CacheGeometry, Pipeline);

pub(super) struct Connection {
    pub pipeline: Option<Pipeline>,
    pub stages: Vec<StageEndpoint>,
    pub geometry: Option<CacheGeometry>,
    /// Bumped when the pipeline is lost: events of older pipelines are ignored.
    pub epoch: u64,
    reconnecting: bool,
    addrs: Vec<String>,
    config: ModelConfig,
    tls: ClientTls,
    interval: Duration,
    health_tx: Arc<watch::Sender<bool>>,
    pub last_error: Arc<Mutex<Option<String>>>,
    pub stage_health: Arc<Mutex<Vec<StageHealth>>>,
    events_tx: mpsc::Sender<(u64, PipelineEvent)>,
    connected_tx: mpsc::Sender<Connected>,
}

pub(super) struct Shared {
    pub health_tx: Arc<watch::Sender<bool>>,
    pub last_error: Arc<Mutex<Option<String>>>,
    pub stage_health: Arc<Mutex<Vec<StageHealth>>>,
}

impl Connection {
    pub fn new(
        addrs: Vec<String>,
        config: ModelConfig,
        tls: ClientTls,
        interval: Duration,
        shared: Shared,
        events_tx: mpsc::Sender<(u64, PipelineEvent)>,
        connected_tx: mpsc::Sender<Connected>,
    ) -> Self {
        if let Ok(mut h) = shared.stage_health.lock() {
            *h = addrs
                .iter()
                .map(|a| StageHealth {
                    address: a.clone(),
                    error: "not connected yet".into(),
                    ..Default::default()
                })
                .collect();
        }
        Connection {
            pipeline: None,
            stages: vec![],
            geometry: None,
            epoch: 0,
            reconnecting: false,
            addrs,
            config,
            tls,
            interval,
            health_tx: shared.health_tx,
            last_error: shared.last_error,
            stage_health: shared.stage_health,
            events_tx,
            connected_tx,
        }
    }

    pub fn set_error(&self, why: &str) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why.to_string());
        }
    }

    /// A pipeline is up: serving.
    pub fn connected(&mut self, stages: Vec<StageEndpoint>, geometry: CacheGeometry, pipeline: Pipeline) {
        self.reconnecting = false;
        if let Ok(mut h) = self.stage_health.lock() {
            *h = stages
                .iter()
                .map(|s| StageHealth {
                    address: s.address.clone(),
                    info: Some(s.info.clone()),
                    healthy: true,
                    error: String::new(),
                })
                .collect();
        }
        self.stages = stages;
        self.geometry = Some(geometry);
        self.pipeline = Some(pipeline);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        let _ = self.health_tx.send(true);
    }

    /// The pipeline broke: not serving until a new one is connected.
    pub fn failed(&mut self, status: &Status) {
        tracing::error!("pipeline failed: {}", status.message());
        self.pipeline = None;
        let _ = self.health_tx.send(false);
        self.set_error(status.message());
        // Until the probes of the reconnection say otherwise, no stage is known to be healthy.
        if let Ok(mut h) = self.stage_health.lock() {
            for s in h.iter_mut() {
                s.healthy = false;
                s.error = format!("pipeline failed: {}", status.message());
            }
        }
        self.epoch += 1;
        self.start_reconnect();
    }

    /// Connects in the background until a pipeline is up; each attempt records every stage's state.
    pub fn start_reconnect(&mut self) {
        if self.reconnecting {
            return;
        }
        self.reconnecting = true;
        let epoch = self.epoch;
        let (addrs, config, tls, interval) =
            (self.addrs.clone(), self.config.clone(), self.tls.clone(), self.interval);
        let (events, connected) = (self.events_tx.clone(), self.connected_tx.clone());
        let (last_error, stage_health) = (self.last_error.clone(), self.stage_health.clone());
        tokio::spawn(async move {
            let timeout = Duration::from_secs(5);
            loop {
                let infos = probe(&addrs, &tls, timeout).await;
                if let Ok(mut h) = stage_health.lock() {
                    for (s, i) in h.iter_mut().zip(&infos) {
                        s.healthy = i.is_ok();
                        s.error = i.as_ref().err().map(|e| e.message().to_string()).unwrap_or_default();
                        s.info = i.as_ref().ok().cloned().or(s.info.take());
                    }
                }
                let attempt = async {
                    let stages = addrs
                        .iter()
                        .zip(infos)
                        .map(|(a, i)| i.map(|info| StageEndpoint { address: a.clone(), info }))
                        .collect::<Result<Vec<_>, _>>()?;
                    let (stages, geometry) = check(stages, &config)?;
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
