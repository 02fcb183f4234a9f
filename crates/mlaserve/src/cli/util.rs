use std::str::FromStr;

use anyhow::{bail, Context};

/// Parses "0,5,7" (commas or whitespace) into token ids.
pub fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| u32::from_str(t).with_context(|| format!("bad token id {t:?}")))
        .collect::<anyhow::Result<_>>()?;
    if ids.is_empty() {
        bail!("no token ids given");
    }
    Ok(ids)
}

/// Logs to stderr; `RUST_LOG` filters (default: warnings).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
