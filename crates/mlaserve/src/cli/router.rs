use std::net::SocketAddr;
use std::path::PathBuf;

use mlaserve_router::RouterOptions;

use super::util::{bind, runtime, shutdown_signal};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Model directory: config.json, tokenizer.json, tokenizer_config.json (weights not needed).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// A pipeline stage address, in layer order (repeat for each stage).
    #[arg(long = "stage", required = true)]
    pub stages: Vec<String>,
    #[command(flatten)]
    pub limits: Limits,
}

/// Batching and request limits shared by `router` and `serve`.
#[derive(clap::Args, Clone)]
pub struct Limits {
    /// New tokens per step across all sequences.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Requests waiting for admission before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_new_tokens: usize,
    /// max_new_tokens when a request leaves it unset.
    #[arg(long, default_value_t = 256)]
    pub default_max_new_tokens: usize,
    /// Steps in flight at once (0 = one per stage).
    #[arg(long, default_value_t = 0)]
    pub max_steps_in_flight: usize,
    /// Name reported by ModelInfo (default: the model directory's name).
    #[arg(long)]
    pub model_id: Option<String>,
}

impl Limits {
    pub fn options(&self, stages: Vec<String>, model: &std::path::Path) -> RouterOptions {
        RouterOptions {
            stages,
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            max_queue: self.max_queue,
            max_new_tokens: self.max_new_tokens,
            default_max_new_tokens: self.default_max_new_tokens,
            max_steps_in_flight: self.max_steps_in_flight,
            model_id: self.model_id.clone().unwrap_or_else(|| {
                model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "mlaserve".into())
            }),
            ..RouterOptions::default()
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = a.limits.options(a.stages.clone(), &a.model);
    runtime()?.block_on(async move {
        let listener = bind(a.listen, "router").await?;
        mlaserve_router::serve(&a.model, opts, listener, shutdown_signal()).await?;
        Ok(())
    })
}
