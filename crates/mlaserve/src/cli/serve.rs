//! `mlaserve serve`: the all-in-one deployment on one machine, a router plus P worker processes
//! (one per pipeline stage) on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context};
use mlaserve_core::ModelConfig;
use mlaserve_model::DType;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::demo;
use super::router::Limits;
use super::util::{bind, runtime, shutdown_signal};
use super::worker::DeviceArg;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Checkpoint directory; without it a small random demo model is created and served.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Pipeline stages (worker processes); layers are split evenly.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    #[arg(long, default_value_t = 1)]
    pub expert_shards: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    #[arg(long, default_value_t = 1024)]
    pub kv_blocks: usize,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[command(flatten)]
    pub limits: Limits,
}

/// Splits `layers` into `stages` contiguous ranges, sizes differing by at most one.
pub fn split_layers(layers: usize, stages: usize) -> Vec<(usize, usize)> {
    (0..stages).map(|i| (i * layers / stages, (i + 1) * layers / stages)).collect()
}

async fn spawn_worker(a: &Args, model: &std::path::Path, range: (usize, usize), threads: usize) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--model")
        .arg(model)
        .arg("--layers")
        .arg(format!("{}..{}", range.0, range.1))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--expert-shards")
        .arg(a.expert_shards.to_string())
        .arg("--device")
        .arg(match a.device {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
        })
        .arg("--dtype")
        .arg(a.dtype.as_str())
        .arg("--kv-blocks")
        .arg(a.kv_blocks.to_string())
        .arg("--block-size")
        .arg(a.block_size.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
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

pub fn run(a: Args) -> anyhow::Result<()> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => demo::ensure_demo_model()?,
    };
    let config = ModelConfig::from_dir(&model)?;
    if a.stages == 0 || a.stages > config.num_hidden_layers {
        bail!("--stages must be between 1 and the model's {} layers", config.num_hidden_layers);
    }
    let threads = (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / a.stages).max(1);
    runtime()?.block_on(async move {
        let mut children = Vec::new();
        let mut addrs = Vec::new();
        for range in split_layers(config.num_hidden_layers, a.stages) {
            let (child, addr) = spawn_worker(&a, &model, range, threads).await?;
            eprintln!("mlaserve: stage layers {}..{} on {addr}", range.0, range.1);
            children.push(child);
            addrs.push(addr);
        }
        let opts = a.limits.options(addrs, &model);
        let listener = bind(a.listen, "router").await?;
        eprintln!("mlaserve: serving {} on {} (mlaserve.v1.Generation)", model.display(), listener.local_addr()?);
        let result = mlaserve_router::serve(&model, opts, listener, shutdown_signal()).await;
        for mut c in children {
            if let Some(pid) = c.id() {
                // SAFETY: plain signal delivery to our own child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), c.wait()).await;
            let _ = c.kill().await;
        }
        result?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::split_layers;

    #[test]
    fn layers_split_evenly() {
        assert_eq!(split_layers(6, 1), vec![(0, 6)]);
        assert_eq!(split_layers(6, 4), vec![(0, 1), (1, 3), (3, 4), (4, 6)]);
        assert_eq!(split_layers(61, 8).iter().map(|r| r.1 - r.0).sum::<usize>(), 61);
    }
}
