use std::path::PathBuf;

use mlaserve_core::settings::{parse_kv_cache_memory, parse_layers};
use mlaserve_telemetry::{Role, Telemetry};
use mlaserve_worker::{DeviceKind, WorkerOptions};

use super::settings::{check_done, load, required, resolve_dtype, server_tls, stage_tls, Global, Overrides};
use super::util::{bind, runtime, serve_metrics, shutdown_signal};

#[derive(clap::Args, Clone, Default)]
pub struct Args {
    /// Checkpoint directory [worker.model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Decoder layers this stage holds, START..END, END exclusive [worker.layers].
    #[arg(long)]
    pub layers: Option<String>,
    /// Internal gRPC address [worker.listen, default 0.0.0.0:50061].
    #[arg(long)]
    pub listen: Option<String>,
    /// Devices (shards) the routed experts are split over [worker.expert_shards, default 1].
    #[arg(long)]
    pub expert_shards: Option<usize>,
    /// cpu or cuda [worker.device, default cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// auto, f32 or bf16 [worker.dtype, default auto: bf16 on cuda, f32 on cpu].
    #[arg(long)]
    pub dtype: Option<String>,
    /// native (as stored: FP8 stays FP8 with its scales), bf16 or f32 [worker.weights, default
    /// native].
    #[arg(long)]
    pub weights: Option<String>,
    /// Blocks in this stage's latent cache; overrides --kv-cache-memory [worker.kv_blocks,
    /// default: from --kv-cache-memory, else 1024].
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Latent-cache memory: a fraction of the memory free after loading the weights (0.9) or a
    /// size (8GiB) [worker.kv_cache_memory, default off].
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// File with the shared stage token; only callers presenting it may use this stage
    /// [security.stage_token_file, default off].
    #[arg(long)]
    pub stage_token_file: Option<String>,
    /// Token slots per cache block [worker.block_size, default 16].
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Prometheus /metrics address [worker.metrics_listen, default off].
    #[arg(long)]
    pub metrics_listen: Option<String>,
}

impl Args {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        o.set("worker.model", self.model.as_ref().map(|p| p.display().to_string()));
        o.set("worker.layers", self.layers.clone());
        o.set("worker.listen", self.listen.clone());
        o.set_num("worker.expert_shards", self.expert_shards);
        o.set("worker.device", self.device.clone());
        o.set("worker.dtype", self.dtype.clone());
        o.set("worker.weights", self.weights.clone());
        o.set_num("worker.kv_blocks", self.kv_blocks);
        o.set("worker.kv_cache_memory", self.kv_cache_memory.clone());
        o.set("security.stage_token_file", self.stage_token_file.clone());
        o.set_num("worker.block_size", self.block_size);
        o.set("worker.metrics_listen", self.metrics_listen.clone());
        o
    }
}

pub fn run(a: Args, g: &Global) -> anyhow::Result<()> {
    let s = load(g, a.overrides())?;
    let w = &s.worker;
    let model = PathBuf::from(required(&w.model, "worker.model", "--model")?);
    let layers =
        parse_layers(required(&w.layers, "worker.layers", "--layers")?).map_err(anyhow::Error::msg)?;
    // TLS files are read here, so that --check fails on a missing one as the real start would.
    let (server_tls, downstream_tls) = (server_tls(&s)?, stage_tls(&s)?);
    // May re-execute this process (NCCL library path); so before any thread or socket exists.
    let nccl = if w.device == "cuda" { super::cuda::prepare(w.expert_shards)? } else { None };
    if check_done(g, &s, "worker") {
        if let Some(v) = nccl {
            println!("# nccl {v}");
        }
        return Ok(());
    }
    if let Some(v) = nccl {
        tracing::info!(nccl = %v, "NCCL ready for expert shards");
    }
    let opts = WorkerOptions {
        model_dir: model,
        layers: layers.clone(),
        listen: w.listen.parse()?,
        expert_shards: w.expert_shards,
        device: if w.device == "cuda" { DeviceKind::Cuda } else { DeviceKind::Cpu },
        dtype: resolve_dtype(&w.dtype, &w.device),
        weights: w.weights.parse().map_err(anyhow::Error::msg)?,
        kv_blocks: w.kv_blocks,
        kv_cache_memory: parse_kv_cache_memory(&w.kv_cache_memory).map_err(anyhow::Error::msg)?,
        block_size: w.block_size,
        server_tls,
        downstream_tls,
    };
    let metrics_listen = w.metrics_listen.clone();
    runtime()?.block_on(async move {
        let telemetry =
            Telemetry::init(&s.telemetry, Role::Worker { layer_start: layers.start, layer_end: layers.end })?;
        serve_metrics(&metrics_listen, &telemetry).await?;
        let listener = bind(opts.listen, "worker").await?;
        mlaserve_worker::serve(opts, listener, Some(&telemetry), shutdown_signal()).await?;
        if let Some(p) = mlaserve_model::profile::report() {
            eprintln!("MLASERVE_PROFILE worker layers {}..{}:\n{p}", layers.start, layers.end);
        }
        telemetry.shutdown();
        Ok(())
    })
}
