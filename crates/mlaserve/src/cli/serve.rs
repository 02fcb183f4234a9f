//! `mlaserve serve`: the all-in-one deployment on one machine, a router plus P worker processes
//! (one per pipeline stage) on loopback.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
use mlaserve_core::{ModelConfig, Settings};
use mlaserve_telemetry::{Role, Telemetry};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::demo;
use super::router::{http_listener, router_options, Limits};
use super::settings::{check_done, load, Global, Overrides};
use super::util::{bind, runtime, serve_metrics, shutdown_signal};

#[derive(clap::Args, Clone, Default)]
pub struct Args {
    /// Checkpoint directory; without it the small trained demo model is served [serve.model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Public gRPC address [serve.listen, default 127.0.0.1:50051].
    #[arg(long)]
    pub listen: Option<String>,
    /// OpenAI-compatible HTTP address; "" turns it off [serve.http_listen, default 127.0.0.1:8000].
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Pipeline stages (worker processes); layers are split evenly [serve.stages, default 1].
    #[arg(long)]
    pub stages: Option<usize>,
    /// Expert shards per stage [serve.expert_shards, default 1].
    #[arg(long)]
    pub expert_shards: Option<usize>,
    /// cpu or cuda [serve.device, default cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// auto, f32 or bf16 [serve.dtype, default auto].
    #[arg(long)]
    pub dtype: Option<String>,
    /// native, bf16 or f32: how every stage holds its weights [serve.weights, default native].
    #[arg(long)]
    pub weights: Option<String>,
    /// Cache blocks per stage; overrides --kv-cache-memory [serve.kv_blocks, default: from
    /// --kv-cache-memory, else 1024].
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Latent-cache memory per stage: a fraction of the memory free after its weights (shared by
    /// all stages of this machine: give each 1/P of what you mean) or a size [serve.kv_cache_memory].
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// File with the shared stage token (workers then accept only this router)
    /// [security.stage_token_file, default off].
    #[arg(long)]
    pub stage_token_file: Option<String>,
    /// Token slots per block [serve.block_size, default 16].
    #[arg(long)]
    pub block_size: Option<usize>,
    #[command(flatten)]
    pub limits: Limits,
}

/// Kernel threads per stage and steps in flight for stages that share this machine's cores.
///
/// A micro-batch per stage in flight would split the same cores between the stages and read each
/// stage's weights once per micro-batch; one step at a time gives every stage all the cores.
/// Measured (`benches/two_stage.py`, 32 streams, 2 stages on 2 cores): 0.94-1.04 of 1 stage one
/// step at a time, 0.64-0.95 with a step per stage on one core each. An explicit
/// `router.max_steps_in_flight` keeps the overlap, the cores split among the steps that run at
/// once. (A router in front of stages on separate machines keeps 0 = a step per stage.)
fn local_pipeline(cores: usize, stages: usize, steps_in_flight: usize) -> (usize, usize) {
    let steps = steps_in_flight.max(1);
    ((cores / steps.min(stages.max(1))).max(1), steps)
}

async fn spawn_worker(
    s: &Settings,
    g: &Global,
    model: &Path,
    range: (usize, usize),
    threads: usize,
) -> anyhow::Result<(Child, String)> {
    let v = &s.serve;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("worker");
    if let Some(c) = &g.config {
        cmd.arg("--config").arg(c);
    }
    for (flag, value) in [
        ("--model", model.display().to_string()),
        ("--layers", format!("{}..{}", range.0, range.1)),
        ("--listen", "127.0.0.1:0".into()),
        ("--expert-shards", v.expert_shards.to_string()),
        ("--device", v.device.clone()),
        ("--dtype", v.dtype.clone()),
        ("--weights", v.weights.clone()),
        ("--kv-blocks", v.kv_blocks.to_string()),
        ("--kv-cache-memory", v.kv_cache_memory.clone()),
        ("--stage-token-file", s.security.stage_token_file.clone()),
        ("--block-size", v.block_size.to_string()),
        ("--log-format", s.telemetry.log_format.clone()),
        ("--log-level", s.telemetry.log_level.clone()),
    ] {
        cmd.arg(flag).arg(value);
    }
    if !s.telemetry.otlp_endpoint.is_empty() {
        cmd.arg("--otlp-endpoint").arg(&s.telemetry.otlp_endpoint);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    if std::env::var_os("MLASERVE_THREADS").is_none() {
        cmd.env("MLASERVE_THREADS", threads.to_string());
    }
    // SAFETY: prctl only affects the child being exec'ed; it makes the worker exit with us.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting a worker process")?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next_line().await? {
            Some(l) => {
                if let Some(rest) = l.strip_prefix("MLASERVE_LISTENING worker ") {
                    break rest.trim().to_string();
                }
            }
            None => bail!("worker for layers {}..{} exited before listening", range.0, range.1),
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

pub fn run(a: Args, g: &Global) -> anyhow::Result<()> {
    let mut o = Overrides::default();
    o.set("serve.model", a.model.as_ref().map(|p| p.display().to_string()));
    o.set("serve.listen", a.listen.clone());
    o.set("serve.http_listen", a.http_listen.clone());
    o.set_num("serve.stages", a.stages);
    o.set_num("serve.expert_shards", a.expert_shards);
    o.set("serve.device", a.device.clone());
    o.set("serve.dtype", a.dtype.clone());
    o.set("serve.weights", a.weights.clone());
    o.set_num("serve.kv_blocks", a.kv_blocks);
    o.set("serve.kv_cache_memory", a.kv_cache_memory.clone());
    o.set("security.stage_token_file", a.stage_token_file.clone());
    o.set_num("serve.block_size", a.block_size);
    a.limits.apply(&mut o);
    let mut s = load(g, o)?;
    if check_done(g, &s, "serve") {
        return Ok(());
    }
    let model =
        if s.serve.model.is_empty() { demo::ensure_demo_model()? } else { PathBuf::from(&s.serve.model) };
    let config = ModelConfig::from_dir(&model)?;
    let stages = s.serve.stages;
    if stages > config.num_hidden_layers {
        bail!("`serve.stages` ({stages}) exceeds the model's {} layers", config.num_hidden_layers);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (threads, steps) = local_pipeline(cores, stages, s.router.max_steps_in_flight);
    s.router.max_steps_in_flight = steps;
    let listen = s.serve.listen.parse()?;
    runtime()?.block_on(async move {
        let telemetry = Telemetry::init(&s.telemetry, Role::Router)?;
        serve_metrics(&s.router.metrics_listen, &telemetry).await?;
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        let ranges = config.balanced_stages(stages).expect("stage count checked above");
        for range in ranges.iter().map(|r| (r.start, r.end)) {
            let (child, addr) = spawn_worker(&s, g, &model, range, threads).await?;
            eprintln!("mlaserve: stage layers {}..{} on {addr}", range.0, range.1);
            children.push(child);
            addrs.push(addr);
        }
        let opts = router_options(&s, addrs, &model)?;
        let http = http_listener(&s.serve.http_listen).await?;
        let listener = bind(listen, "router").await?;
        eprintln!(
            "mlaserve: serving {} on {} (mlaserve.v1.Generation)",
            model.display(),
            listener.local_addr()?
        );
        if let Some(h) = &http {
            eprintln!("mlaserve: OpenAI-compatible HTTP on http://{}/v1", h.local_addr()?);
        }
        let result =
            mlaserve_router::serve(&model, opts, listener, http, &telemetry, shutdown_signal()).await;
        for mut c in children {
            if let Some(pid) = c.id() {
                // SAFETY: plain signal delivery to our own child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), c.wait()).await;
            let _ = c.kill().await;
        }
        telemetry.shutdown();
        result?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::local_pipeline;

    #[test]
    fn local_stages_share_the_cores_one_step_at_a_time_unless_told() {
        // Default (0): one step at a time, every stage on all cores.
        assert_eq!(local_pipeline(2, 2, 0), (2, 1));
        assert_eq!(local_pipeline(16, 4, 0), (16, 1));
        assert_eq!(local_pipeline(8, 1, 0), (8, 1));
        // Explicit overlap: the cores split among the steps running at once.
        assert_eq!(local_pipeline(16, 4, 4), (4, 4));
        assert_eq!(local_pipeline(16, 4, 2), (8, 2));
        assert_eq!(local_pipeline(16, 2, 8), (8, 8));
        // Never zero threads.
        assert_eq!(local_pipeline(2, 4, 4), (1, 4));
        assert_eq!(local_pipeline(0, 2, 0), (1, 1));
    }
}
