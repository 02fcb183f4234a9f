use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;

use mlaserve_model::DType;
use mlaserve_worker::{DeviceKind, WorkerOptions};

use super::util::{bind, parse_layers, runtime, shutdown_signal};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Decoder layers this stage holds, START..END (END exclusive).
    #[arg(long, value_parser = parse_layers)]
    pub layers: Range<usize>,
    #[arg(long, default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,
    /// Devices (shards) the routed experts are split over.
    #[arg(long, default_value_t = 1)]
    pub expert_shards: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// Blocks in this stage's latent cache.
    #[arg(long, default_value_t = 1024)]
    pub kv_blocks: usize,
    /// Token slots per cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl Args {
    pub fn options(&self) -> WorkerOptions {
        WorkerOptions {
            model_dir: self.model.clone(),
            layers: self.layers.clone(),
            listen: self.listen,
            expert_shards: self.expert_shards,
            device: match self.device {
                DeviceArg::Cpu => DeviceKind::Cpu,
                DeviceArg::Cuda => DeviceKind::Cuda,
            },
            dtype: self.dtype,
            kv_blocks: self.kv_blocks,
            block_size: self.block_size,
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.expert_shards == 0 || a.kv_blocks == 0 || a.block_size == 0 {
        anyhow::bail!("--expert-shards, --kv-blocks and --block-size must be positive");
    }
    let opts = a.options();
    runtime()?.block_on(async move {
        let listener = bind(opts.listen, "worker").await?;
        mlaserve_worker::serve(opts, listener, shutdown_signal()).await?;
        Ok(())
    })
}
