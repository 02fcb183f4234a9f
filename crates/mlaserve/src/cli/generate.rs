use std::path::PathBuf;

use anyhow::Context;
use mlaserve_core::SamplingParams;
use mlaserve_model::{DType, Engine, EngineRequest, LoadOptions, Model};

use super::util::parse_ids;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// A prompt of token ids (repeat for several prompts; all run as one continuous batch).
    #[arg(long, required = true)]
    ids: Vec<String>,
    #[arg(long)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// native (as stored: FP8 stays FP8 with its scales), bf16 or f32.
    #[arg(long, default_value = "native")]
    weights: mlaserve_core::WeightFormat,
    /// cpu, or cuda (device 0; needs a `--features cuda` build and a GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Stop a prompt's generation at the end-of-sequence token.
    #[arg(long)]
    stop_at_eos: bool,
    /// New tokens per step (prefill chunking budget).
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Cache blocks; default: enough for every prompt at once. Fewer make the batch preempt and
    /// recompute sequences (the output stays the same).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// Print one JSON object per prompt (`{"ids": [...]}`).
    #[arg(long)]
    json: bool,
    /// Print prefill/decode timings as JSON on stderr.
    #[arg(long)]
    stats: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = match a.device.as_str() {
        "cpu" => tch::Device::Cpu,
        "cuda" if tch::Cuda::is_available() => tch::Device::Cuda(0),
        "cuda" => anyhow::bail!(
            "--device cuda: libtorch sees no CUDA device (a `--features cuda` build on a GPU host?)"
        ),
        other => anyhow::bail!("--device must be cpu or cuda, got {other:?}"),
    };
    let model = Model::load(
        &a.model,
        &LoadOptions { dtype: a.dtype, device, weights: a.weights, ..Default::default() },
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let stop_ids = if a.stop_at_eos { model.config().eos_token_ids.clone() } else { vec![] };
    let reqs: Vec<EngineRequest> = a
        .ids
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(EngineRequest {
                prompt: parse_ids(s)?,
                max_new_tokens: a.max_new_tokens,
                params: SamplingParams {
                    temperature: a.temperature,
                    seed: a.seed.wrapping_add(i as u64),
                    ..Default::default()
                },
                stop_ids: stop_ids.clone(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(r) =
        reqs.iter().find(|r| r.prompt.len() + r.max_new_tokens > model.config().max_position_embeddings)
    {
        anyhow::bail!(
            "prompt of {} tokens plus {} new exceeds the model's {} positions",
            r.prompt.len(),
            r.max_new_tokens,
            model.config().max_position_embeddings
        );
    }
    let blocks = a.kv_blocks.unwrap_or_else(|| Engine::blocks_needed(&reqs, a.block_size));
    let mut engine = Engine::new(&model, blocks, a.block_size, a.step_tokens);
    let outs = engine.generate(&reqs)?;
    if let Some(p) = mlaserve_model::profile::report() {
        eprint!("{p}");
    }
    if a.stats {
        let s = engine.stats();
        eprintln!(
            "{}",
            serde_json::json!({
                "prefill_secs": s.prefill_secs,
                "decode_secs": s.decode_secs,
                "decode_steps": s.decode_steps,
                "decode_tokens": s.decode_tokens,
                "decode_tokens_per_sec": s.decode_tokens as f64 / s.decode_secs.max(1e-9),
                // Decode steps run in both forms and found equal (MLASERVE_DECODE_STEP=check).
                "checked_steps": mlaserve_model::checked_steps(),
            })
        );
    }
    for ids in outs {
        if a.json {
            println!("{}", serde_json::json!({ "ids": ids }));
        } else {
            println!("{}", ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","));
        }
    }
    Ok(())
}
