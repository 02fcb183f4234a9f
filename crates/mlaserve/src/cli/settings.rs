//! Flags shared by the serving roles, and the merge of defaults < config file < environment < flags.

use std::path::PathBuf;

use anyhow::bail;
use config::Value;
use mlaserve_core::Settings;

#[derive(clap::Args, Clone, Default)]
pub struct Global {
    /// TOML configuration file (see `mlaserve config` for every key and its default).
    #[arg(long, global = true, env = "MLASERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Parse flags and configuration, print the effective settings and exit without serving.
    #[arg(long, global = true)]
    pub check: bool,
    /// OTLP/gRPC endpoint for traces and metrics (also OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, global = true)]
    pub otlp_endpoint: Option<String>,
    /// Log format: text or json.
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// Log filter such as "info" or "warn,mlaserve=debug" (RUST_LOG wins when set).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

/// Explicit flags, as configuration keys.
#[derive(Default)]
pub struct Overrides(Vec<(String, Value)>);

impl Overrides {
    pub fn set<T: Into<Value>>(&mut self, key: &str, v: Option<T>) {
        if let Some(v) = v {
            self.0.push((key.to_string(), v.into()));
        }
    }

    pub fn set_num(&mut self, key: &str, v: Option<usize>) {
        self.set(key, v.map(|n| n as u64));
    }
}

pub fn load(g: &Global, mut ov: Overrides) -> anyhow::Result<Settings> {
    ov.set("telemetry.otlp_endpoint", g.otlp_endpoint.clone());
    ov.set("telemetry.log_format", g.log_format.clone());
    ov.set("telemetry.log_level", g.log_level.clone());
    Ok(Settings::load(g.config.as_deref(), std::env::vars(), &ov.0)?)
}

/// A required string setting: fails naming the key and the three ways to set it.
pub fn required<'a>(value: &'a str, key: &str, flag: &str) -> anyhow::Result<&'a str> {
    if value.trim().is_empty() {
        let env = format!("MLASERVE_{}", key.replace('.', "__").to_uppercase());
        bail!("`{key}` is required: pass {flag}, set it in the config file, or set {env}");
    }
    Ok(value)
}

/// "auto" means bf16 on GPUs and f32 on CPUs (where libtorch's bf16 matmuls are slow).
pub fn resolve_dtype(dtype: &str, device: &str) -> mlaserve_model::DType {
    match (dtype, device) {
        ("auto", "cuda") | ("bf16", _) => mlaserve_model::DType::BF16,
        _ => mlaserve_model::DType::F32,
    }
}

/// With `--check`: print what would run and stop.
pub fn check_done(g: &Global, s: &Settings, role: &str) -> bool {
    if g.check {
        println!("# mlaserve {role}: configuration OK\n{}", s.to_toml());
    }
    g.check
}

/// Client TLS and the stage token towards stages (router and workers alike); a worker also
/// requires that token of its callers.
pub fn stage_tls(s: &Settings) -> anyhow::Result<mlaserve_proto::transport::ClientTls> {
    let c = &s.security;
    let mut tls = mlaserve_proto::transport::ClientTls::from_files(
        &c.stage_ca,
        &c.stage_client_cert,
        &c.stage_client_key,
        &c.stage_server_name,
    )
    .map_err(|e| anyhow::anyhow!("security: {e}"))?;
    tls.stage_token = mlaserve_proto::transport::read_token(&c.stage_token_file, "stage token file")
        .map_err(|e| anyhow::anyhow!("`security.stage_token_file`: {e}"))?;
    Ok(tls)
}

/// Server TLS of this process (public port of the router, internal port of a worker).
pub fn server_tls(s: &Settings) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let c = &s.security;
    mlaserve_proto::transport::server_tls(&c.tls_cert, &c.tls_key, &c.tls_client_ca)
        .map_err(|e| anyhow::anyhow!("security: {e}"))
}

/// The public API's bearer token: `security.auth_token_file`, else the variable named by
/// `security.auth_token_env` (default MLASERVE_AUTH_TOKEN); None = no authentication.
pub fn auth_token(s: &Settings) -> anyhow::Result<Option<String>> {
    let c = &s.security;
    let token = if !c.auth_token_file.is_empty() {
        let t = std::fs::read_to_string(&c.auth_token_file)
            .map_err(|e| anyhow::anyhow!("`security.auth_token_file` {}: {e}", c.auth_token_file))?;
        Some(t)
    } else {
        let var = if c.auth_token_env.is_empty() { "MLASERVE_AUTH_TOKEN" } else { c.auth_token_env.as_str() };
        std::env::var(var).ok()
    };
    match token.map(|t| t.trim().to_string()) {
        Some(t) if t.is_empty() => bail!("the configured bearer token is empty"),
        other => Ok(other),
    }
}
