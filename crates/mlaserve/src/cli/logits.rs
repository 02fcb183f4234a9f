use std::path::PathBuf;

use anyhow::Context;
use mlaserve_model::{DType, LoadOptions, Model, PrefillForm};
use tch::Tensor;

use super::util::parse_ids;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Token ids, comma separated.
    #[arg(long)]
    ids: String,
    /// Position of the first token (no earlier context).
    #[arg(long, default_value_t = 0)]
    start_pos: usize,
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// native (as stored: FP8 stays FP8), bf16 or f32.
    #[arg(long, default_value = "native")]
    weights: mlaserve_core::WeightFormat,
    /// Also write `mtp_logits` [T-1, vocab] from the MTP module.
    #[arg(long)]
    mtp: bool,
    /// How long prefills attend (auto picks the cheaper form).
    #[arg(long, value_enum, default_value = "auto", hide = true)]
    prefill_form: PrefillArg,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrefillArg {
    Auto,
    Absorbed,
    Expanded,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ids = parse_ids(&a.ids)?;
    let opts = LoadOptions {
        dtype: a.dtype,
        mtp: a.mtp,
        weights: a.weights,
        prefill_form: match a.prefill_form {
            PrefillArg::Auto => PrefillForm::Auto,
            PrefillArg::Absorbed => PrefillForm::Absorbed,
            PrefillArg::Expanded => PrefillForm::Expanded,
        },
        ..Default::default()
    };
    let model = Model::load(&a.model, &opts).with_context(|| format!("loading {}", a.model.display()))?;
    if a.mtp && !model.has_mtp() {
        anyhow::bail!("--mtp: the checkpoint has no MTP module (num_nextn_predict_layers is 0)");
    }
    let (logits, mtp) = model.full_logits(&ids, a.start_pos, a.mtp)?;
    let mut out: Vec<(&str, Tensor)> = vec![("logits", logits)];
    if let Some(m) = mtp {
        out.push(("mtp_logits", m));
    }
    Tensor::write_safetensors(&out, &a.out).with_context(|| format!("writing {}", a.out.display()))
}
