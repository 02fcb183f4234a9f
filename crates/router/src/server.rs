//! Router process assembly: model facts, tokenizer, scheduler, and the public gRPC server with
//! health and reflection.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use mlaserve_core::ModelConfig;
use mlaserve_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::auth::{remap_oversize, BearerAuth};
use crate::options::RouterOptions;
use crate::scheduler::SchedulerHandle;
use crate::service::GenerationService;
use crate::tokenizer::TokenizerInfo;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] mlaserve_core::ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("server: {0}")]
    Server(String),
    #[error("the scheduler stopped ({0}): exiting so that the router is restarted")]
    Scheduler(String),
}

/// Everything the router needs from the model directory: config.json and the tokenizer files.
pub fn load_model_facts(dir: &Path) -> Result<(ModelConfig, TokenizerInfo), RouterError> {
    Ok((ModelConfig::from_dir(dir)?, TokenizerInfo::from_dir(dir)?))
}

/// Serves the public API on `listener` until `shutdown` resolves.
pub async fn serve(
    dir: &Path,
    opts: RouterOptions,
    listener: TcpListener,
    http: Option<TcpListener>,
    telemetry: &mlaserve_telemetry::Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let (config, tok) = load_model_facts(dir)?;
    let tok = Arc::new(tok);
    let metrics =
        mlaserve_telemetry::genai::RouterMetrics::new(&telemetry.meter("mlaserve.router"), &opts.model_id);
    let scheduler = crate::scheduler::spawn(
        tok.clone(),
        config.clone(),
        opts.clone(),
        metrics,
        telemetry.tracing_enabled(),
    );
    let supervisor = scheduler.clone();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    // "liveness": the process answers (a worker restart must not restart the router).
    reporter.set_service_status("liveness", ServingStatus::Serving).await;
    reporter.set_not_serving::<GenerationServer<GenerationService>>().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(track_health(scheduler.clone(), reporter, stop_rx.clone()));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let auth = BearerAuth::new(opts.auth_token.clone());
    let core = Arc::new(GenerationService { tok, config, opts: opts.clone(), scheduler });
    if let Some(http) = http {
        let api = Arc::new(crate::http::HttpApi {
            service: core.clone(),
            auth: auth.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        let mut stopping = stop_rx.clone();
        let tls = opts.http_tls.clone();
        let max_body = opts.max_request_bytes;
        tokio::spawn(async move {
            let done = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::http::serve(api, http, tls, max_body, done).await {
                tracing::error!("the HTTP server stopped: {e}");
            }
        });
    }
    let service = GenerationServer::from_arc(core)
        .max_decoding_message_size(opts.max_request_bytes)
        .max_encoding_message_size(64 << 20);
    let service = tonic::service::interceptor::InterceptedService::new(service, move |r| auth.check(r));
    let (refl_v1, refl_v1alpha) = mlaserve_proto::reflection_services();
    let mut stopping = stop_rx.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = opts.server_tls.clone() {
        builder =
            builder.tls_config(tls).map_err(|e| RouterError::Server(format!("TLS configuration: {e}")))?;
    }
    let server = builder
        .layer(tower::util::MapResponseLayer::new(remap_oversize))
        .add_service(health)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(mlaserve_proto::transport::incoming(listener), async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
    tokio::pin!(server);
    // After the signal the server stops accepting and waits for open streams; at most drain_timeout.
    let mut stopped = stop_rx;
    let drain = opts.drain_timeout;
    tokio::select! {
        r = &mut server => r.map_err(|e| RouterError::Server(e.to_string())),
        // Exiting lets the orchestrator restart the router; open streams end with an error status.
        why = supervisor.died() => Err(RouterError::Scheduler(why)),
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tracing::info!(secs = drain.as_secs_f64(), "draining in-flight streams");
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!("drain timeout: closing the remaining streams");
            Ok(())
        }
    }
}

/// Mirrors the pipeline's state into grpc.health.v1 (overall and per service), as it changes.
async fn track_health(
    scheduler: SchedulerHandle,
    reporter: tonic_health::server::HealthReporter,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut health = scheduler.health_changes();
    loop {
        let serving = *health.borrow_and_update() && !*stopping.borrow_and_update();
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        if serving {
            reporter.set_serving::<GenerationServer<GenerationService>>().await;
        } else {
            reporter.set_not_serving::<GenerationServer<GenerationService>>().await;
        }
        tokio::select! {
            r = health.changed() => if r.is_err() { return },
            r = stopping.changed() => if r.is_err() { return },
        }
    }
}
