//! Command-line interface. Command names, flags and outputs here are a stable interface that tests,
//! the Helm chart and users rely on.

mod generate;
mod logits;
mod template;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mlaserve", version, about = "Serve DeepSeek-V3-architecture models over gRPC")]
pub struct Cli {
    /// Intra-op CPU threads for libtorch (default: all cores).
    #[arg(long, global = true, env = "MLASERVE_THREADS")]
    threads: Option<i32>,
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
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    util::init_logging();
    if let Some(t) = cli.threads {
        tch::set_num_threads(t);
    }
    match cli.command {
        Command::Logits(a) => logits::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Template(a) => template::run(a),
    }
}
