//! `mlaserve template`: render chat messages with a model's chat template, exactly as the router
//! does for chat requests, so that templates can be checked against transformers.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use mlaserve_router::TokenizerInfo;
use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory with tokenizer.json and tokenizer_config.json (or chat_template.jinja).
    #[arg(long)]
    model: PathBuf,
    /// JSON file holding the array of messages, e.g. [{"role": "user", "content": "hi"}].
    #[arg(long)]
    messages: PathBuf,
    /// JSON file holding the array of tool schemas.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Do not append the assistant prefix (add_generation_prompt=false).
    #[arg(long)]
    no_generation_prompt: bool,
    /// Print the prompt's token ids as a JSON array (encoded without adding special tokens, as
    /// apply_chat_template(tokenize=True) does) instead of its text.
    #[arg(long)]
    ids: bool,
}

fn read_array(path: &Path, what: &str) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{what} file {} is not JSON", path.display()))?;
    match value {
        Value::Array(items) => Ok(items),
        _ => bail!("{what} file {} must hold a JSON array", path.display()),
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let tok = TokenizerInfo::from_dir(&a.model)?;
    let messages = read_array(&a.messages, "messages")?;
    let tools = a.tools.as_deref().map(|p| read_array(p, "tools")).transpose()?;
    let template = tok
        .chat_template_for(tools.is_some())
        .with_context(|| format!("{} has no chat template", a.model.display()))?;
    let text = template
        .render(&messages, tools.as_deref(), !a.no_generation_prompt)
        .context("cannot render the chat template")?;
    let mut out = std::io::stdout().lock();
    if a.ids {
        let ids = tok.encode(&text, false)?;
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    } else {
        out.write_all(text.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}
