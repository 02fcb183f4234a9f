//! Worker process assembly: bind, report NOT_SERVING while the model loads, then serve steps.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use mlaserve_core::settings::{KvCacheMemory, DEFAULT_KV_BLOCKS};
use mlaserve_model::{DType, LoadOptions, Model};
use mlaserve_proto::internal::v1::stage_server::StageServer;
use mlaserve_proto::internal::v1::StageInfo;
use tch::Device;
use tokio::net::TcpListener;

use crate::compute::Compute;
use crate::error::StageError;
use crate::service::{StageFacts, StageService};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub model_dir: PathBuf,
    pub layers: Range<usize>,
    pub listen: SocketAddr,
    pub expert_shards: usize,
    pub device: DeviceKind,
    pub dtype: DType,
    /// How matrix weights are held (`--weights`).
    pub weights: mlaserve_core::WeightFormat,
    /// Cache blocks; 0 = sized by `kv_cache_memory`, or the default count without it.
    pub kv_blocks: usize,
    pub kv_cache_memory: Option<KvCacheMemory>,
    pub block_size: usize,
    /// TLS on this stage's port; with a client CA only callers with a valid certificate get in.
    pub server_tls: Option<tonic::transport::ServerTlsConfig>,
    /// TLS towards the next stage.
    pub downstream_tls: mlaserve_proto::transport::ClientTls,
}

/// The devices of a stage: the main one (attention, norms, shared experts) and one per expert shard.
fn devices(opts: &WorkerOptions) -> Result<(Device, Vec<Device>), StageError> {
    let g = opts.expert_shards.max(1);
    match opts.device {
        DeviceKind::Cpu => Ok((Device::Cpu, vec![Device::Cpu; g])),
        DeviceKind::Cuda => {
            if !tch::Cuda::is_available() {
                return Err(StageError::failed_precondition(if cfg!(feature = "cuda") {
                    "--device cuda: libtorch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES, a CUDA libtorch?)"
                } else {
                    "--device cuda: this binary is built without `--features cuda`"
                }));
            }
            let n = tch::Cuda::device_count() as usize;
            if g > n {
                return Err(StageError::invalid(format!("--expert-shards {g} exceeds the {n} CUDA devices")));
            }
            Ok((Device::Cuda(0), (0..g).map(Device::Cuda).collect()))
        }
    }
}

fn load(opts: &WorkerOptions) -> Result<(Compute, StageFacts), StageError> {
    let (device, expert_devices) = devices(opts)?;
    let model = Model::load(
        &opts.model_dir,
        &LoadOptions {
            dtype: opts.dtype,
            device,
            layers: Some(opts.layers.clone()),
            mtp: true,
            expert_devices,
            weights: opts.weights,
            ..Default::default()
        },
    )?;
    let c = model.config();
    let kv_blocks = cache_blocks(opts, model.layer_range().len(), model.has_mtp(), c.latent_dim())?;
    let cache_bytes = kv_blocks
        * opts.block_size
        * c.latent_dim()
        * opts.dtype.size_in_bytes()
        * (model.layer_range().len() + usize::from(model.has_mtp()));
    tracing::info!(kv_blocks, block_size = opts.block_size, cache_bytes, "latent cache sized");
    let info = StageInfo {
        layer_start: opts.layers.start as u32,
        layer_end: opts.layers.end as u32,
        num_hidden_layers: c.num_hidden_layers as u32,
        first: model.is_first(),
        last: model.is_last(),
        has_mtp: model.has_mtp(),
        dtype: opts.dtype.to_string(),
        device: match opts.device {
            DeviceKind::Cpu => "cpu".into(),
            DeviceKind::Cuda => "cuda".into(),
        },
        expert_shards: model.expert_shards() as u32,
        kv_blocks: kv_blocks as u32,
        block_size: opts.block_size as u32,
        hidden_size: c.hidden_size as u32,
        vocab_size: c.vocab_size as u32,
        model_type: c.model_type.clone(),
        cache_bytes: cache_bytes as u64,
        active_sequences: 0,
        kernel: model.kernel().into(),
        weights: model.weights_held().into(),
    };
    let compute = Compute::spawn(model, kv_blocks, opts.block_size);
    Ok((compute, StageFacts { info }))
}

/// Blocks of this stage's latent cache: the explicit count, else what `kv_cache_memory` holds
/// (its share of the memory left after the weights), else the default.
fn cache_blocks(
    opts: &WorkerOptions,
    layers: usize,
    mtp: bool,
    latent_dim: usize,
) -> Result<usize, StageError> {
    if opts.kv_blocks > 0 {
        return Ok(opts.kv_blocks);
    }
    let Some(mem) = opts.kv_cache_memory else { return Ok(DEFAULT_KV_BLOCKS) };
    let bytes = match (mem, opts.device) {
        (KvCacheMemory::Bytes(b), _) => b,
        (KvCacheMemory::Fraction(f), DeviceKind::Cpu) => (available_host_memory()? as f64 * f) as u64,
        (KvCacheMemory::Fraction(f), DeviceKind::Cuda) => (free_device_memory()? as f64 * f) as u64,
    };
    let elt = opts.dtype.size_in_bytes();
    let blocks = mlaserve_model::cache::blocks_for_bytes(
        bytes as usize,
        layers,
        mtp,
        opts.block_size,
        latent_dim,
        elt,
    );
    if blocks == 0 {
        return Err(StageError::invalid(format!(
            "worker.kv_cache_memory: {bytes} bytes hold no cache block of {} bytes",
            opts.block_size * latent_dim * elt * (layers + usize::from(mtp))
        )));
    }
    Ok(blocks)
}

/// Free memory of device 0, which holds the stage's latent cache (after the weights are loaded).
#[cfg(feature = "cuda")]
fn free_device_memory() -> Result<u64, StageError> {
    mlaserve_model::device_memory::cuda_mem_info(0)
        .map(|(free, _)| free)
        .map_err(|e| StageError::internal(format!("worker.kv_cache_memory: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn free_device_memory() -> Result<u64, StageError> {
    Err(StageError::failed_precondition("--device cuda: this binary is built without `--features cuda`"))
}

/// MemAvailable of /proc/meminfo, in bytes: free memory plus what the kernel can reclaim.
fn available_host_memory() -> Result<u64, StageError> {
    let info = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| StageError::internal(format!("cannot read /proc/meminfo: {e}")))?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| StageError::internal("no MemAvailable in /proc/meminfo"))
}

/// Serves one stage until `shutdown` resolves. The listener is bound before the model loads so
/// health checks answer (NOT_SERVING) during long loads.
pub async fn serve(
    opts: WorkerOptions,
    listener: TcpListener,
    telemetry: Option<&mlaserve_telemetry::Telemetry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StageError> {
    let metrics = telemetry.map(|t| {
        mlaserve_telemetry::genai::StageMetrics::new(
            &t.meter("mlaserve.worker"),
            opts.layers.start,
            opts.layers.end,
        )
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    // Overall health follows the Stage service (NOT_SERVING while loading); "liveness" only says the
    // process answers, for probes that must not restart a stage during a long load.
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    reporter.set_service_status("liveness", tonic_health::ServingStatus::Serving).await;
    reporter.set_not_serving::<StageServer<StageService>>().await;
    let loaded: Arc<OnceLock<(Compute, StageFacts)>> = Arc::new(OnceLock::new());
    let service = StageServer::new(StageService::new(loaded.clone(), metrics, opts.downstream_tls.clone()))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    // Closed stage: with a stage token, only its router (and the previous stage) may call it.
    let auth = mlaserve_proto::auth::BearerAuth::new(opts.downstream_tls.stage_token.clone());
    let service = tonic::service::interceptor::InterceptedService::new(service, move |r| auth.check(r));
    let (refl_v1, refl_v1alpha) = mlaserve_proto::reflection_services();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = opts.server_tls.clone() {
        builder =
            builder.tls_config(tls).map_err(|e| StageError::internal(format!("TLS configuration: {e}")))?;
    }
    let server = builder
        .add_service(health)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(mlaserve_proto::transport::incoming(listener), shutdown);
    let server = tokio::spawn(server);

    let load_opts = opts.clone();
    let started = std::time::Instant::now();
    let loaded_stage = tokio::task::spawn_blocking(move || load(&load_opts))
        .await
        .map_err(|e| StageError::internal(format!("model loading panicked: {e}")))?;
    match loaded_stage {
        Ok(stage) => {
            let _ = loaded.set(stage);
            reporter.set_serving::<StageServer<StageService>>().await;
            reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            tracing::info!(
                layers = ?opts.layers,
                secs = started.elapsed().as_secs_f64(),
                "stage ready"
            );
        }
        Err(e) => {
            server.abort();
            return Err(e);
        }
    }
    server
        .await
        .map_err(|e| StageError::internal(format!("server task: {e}")))?
        .map_err(|e| StageError::internal(format!("server: {e}")))
}
