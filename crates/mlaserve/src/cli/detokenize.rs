//! `mlaserve detokenize`: token ids to text with the router's incremental detokenizer, printing
//! each streamed delta, so that streaming can be checked against transformers' decode.

use std::path::PathBuf;

use mlaserve_router::{IncrementalDetokenizer, TokenizerInfo};

use super::util::parse_ids;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory with tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, streamed one at a time.
    #[arg(long)]
    ids: String,
    /// Ids decoded before the streamed ones (e.g. the prompt's tail): they shape spacing, but are
    /// not printed.
    #[arg(long, default_value = "")]
    context: String,
    /// Keep special tokens in the text.
    #[arg(long)]
    keep_special: bool,
}

/// Prints a JSON array: the delta after each id, then what the end flushes.
pub fn run(a: Args) -> anyhow::Result<()> {
    let tok = TokenizerInfo::from_dir(&a.model)?;
    let context = if a.context.trim().is_empty() { vec![] } else { parse_ids(&a.context)? };
    let mut d = IncrementalDetokenizer::new(&context, !a.keep_special);
    let mut deltas = vec![];
    for id in parse_ids(&a.ids)? {
        deltas.push(d.push(&tok, id)?);
    }
    deltas.push(d.finish(&tok)?);
    println!("{}", serde_json::to_string(&deltas)?);
    Ok(())
}
