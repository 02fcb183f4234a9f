//! Command-line interface. Command names, flags and outputs here are a stable interface that tests,
//! the Helm chart and users rely on.

mod bench;
mod client;
mod cuda;
mod demo;
mod detokenize;
mod generate;
mod logits;
mod plan;
mod router;
mod serve;
mod settings;
mod template;
mod util;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mlaserve", version, about = "Serve DeepSeek-V3-architecture models over gRPC")]
pub struct Cli {
    /// CPU threads for the model's matrix products (default: all cores). libtorch's own small ops
    /// run on one thread next to them.
    #[arg(long, global = true, env = "MLASERVE_THREADS")]
    threads: Option<i32>,
    #[command(flatten)]
    global: settings::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of one token sequence to a safetensors file.
    Logits(logits::Args),
    /// Generate continuations of one or more token-id prompts as one continuous batch.
    Generate(generate::Args),
    /// Render chat messages with a model's chat template (as the router would) and print the prompt.
    Template(template::Args),
    /// Stream token ids through the router's incremental detokenizer and print each text delta.
    Detokenize(detokenize::Args),
    /// Serve one pipeline stage (a range of layers) over the internal gRPC protocol.
    Worker(worker::Args),
    /// Serve the public API, driving the given pipeline stages.
    Router(router::Args),
    /// All in one: a router and one worker process per stage on this machine.
    Serve(serve::Args),
    /// Stream a completion of a text prompt from a running router.
    Complete(client::CompleteArgs),
    /// Chat with a running router (one message, or interactively from stdin).
    Chat(client::ChatArgs),
    /// Load generator: concurrent streams against a router; throughput and latency percentiles.
    Bench(bench::Args),
    /// Write out (if needed) the trained demo model and print its directory.
    DemoModel,
    /// Print the effective configuration (defaults < --config file < MLASERVE_* environment) as TOML.
    Config,
    /// Plan a deployment: weights per stage and device by component, latent cache per token, KV
    /// capacity, longest context, and whether it fits (reads config.json and safetensors headers only).
    Plan(plan::Args),
    /// Print balanced layer ranges for a pipeline of P stages (one START..END per line).
    PlanStages {
        /// Checkpoint directory (only config.json is read).
        #[arg(long)]
        model: std::path::PathBuf,
        #[arg(long)]
        stages: usize,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // Serving roles set up logging with their telemetry settings; tools log plainly.
    if !matches!(cli.command, Command::Worker(_) | Command::Router(_) | Command::Serve(_)) {
        util::init_logging();
    }
    tch::set_num_threads(mlaserve_model::kernels::LIBTORCH_CPU_THREADS);
    // A kernel path the CPU lacks (MLASERVE_KERNEL) fails here, before anything loads.
    mlaserve_model::kernels::isa::init_from_env()?;
    if let Some(t) = cli.threads.filter(|&t| t > 0) {
        mlaserve_model::pool::init_global(t as usize);
    }
    match cli.command {
        Command::Logits(a) => logits::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Template(a) => template::run(a),
        Command::Detokenize(a) => detokenize::run(a),
        Command::Worker(a) => worker::run(a, &cli.global),
        Command::Router(a) => router::run(a, &cli.global),
        Command::Serve(a) => serve::run(a, &cli.global),
        Command::Complete(a) => client::complete(a),
        Command::Chat(a) => client::chat(a),
        Command::Bench(a) => bench::run(a),
        Command::DemoModel => {
            println!("{}", demo::ensure_demo_model()?.display());
            Ok(())
        }
        Command::Plan(a) => plan::run(a),
        Command::PlanStages { model, stages } => {
            let c = mlaserve_core::ModelConfig::from_dir(&model)?;
            let ranges = c.balanced_stages(stages).ok_or_else(|| {
                anyhow::anyhow!("--stages must be between 1 and the model's {} layers", c.num_hidden_layers)
            })?;
            for r in ranges {
                println!("{}..{}", r.start, r.end);
            }
            Ok(())
        }
        Command::Config => {
            print!("{}", settings::load(&cli.global, settings::Overrides::default())?.to_toml());
            Ok(())
        }
    }
}
