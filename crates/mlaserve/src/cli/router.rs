use std::path::{Path, PathBuf};
use std::time::Duration;

use mlaserve_core::Settings;
use mlaserve_router::RouterOptions;
use mlaserve_telemetry::{Role, Telemetry};

use super::settings::{auth_token, check_done, load, required, server_tls, stage_tls, Global, Overrides};
use super::util::{bind, runtime, serve_metrics, shutdown_signal};

#[derive(clap::Args, Clone, Default)]
pub struct Args {
    /// Model directory: config.json and tokenizer files, weights not needed [router.model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Public gRPC address [router.listen, default 0.0.0.0:50051].
    #[arg(long)]
    pub listen: Option<String>,
    /// A pipeline stage address, in layer order; repeat per stage [router.stages].
    #[arg(long = "stage")]
    pub stages: Vec<String>,
    /// OpenAI-compatible HTTP address [router.http_listen, default off].
    #[arg(long)]
    pub http_listen: Option<String>,
    /// File with the shared stage token, sent on every call to the stages
    /// [security.stage_token_file, default off].
    #[arg(long)]
    pub stage_token_file: Option<String>,
    #[command(flatten)]
    pub limits: Limits,
}

/// Batching and request limits shared by `router` and `serve` (keys under `router.`).
#[derive(clap::Args, Clone, Default)]
pub struct Limits {
    /// New tokens per step across all sequences [default 512].
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Sequences running at once [default 256].
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Requests waiting for admission before RESOURCE_EXHAUSTED [default 1024].
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// Largest max_new_tokens a request may ask for [default 32768].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// max_new_tokens when a request leaves it unset [default 256].
    #[arg(long)]
    pub default_max_new_tokens: Option<usize>,
    /// Steps in flight at once, 0 = one per stage (`serve`: one at a time, its stages share the
    /// cores) [default 0].
    #[arg(long)]
    pub max_steps_in_flight: Option<usize>,
    /// Name reported by ModelInfo and telemetry [default: the model directory's name].
    #[arg(long)]
    pub model_id: Option<String>,
    /// Prometheus /metrics address [router.metrics_listen, default off].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Seconds to let streams finish after SIGTERM [router.drain_timeout_secs, default 30].
    #[arg(long)]
    pub drain_timeout_secs: Option<u64>,
    /// Reuse cached prefixes across requests: true or false [router.prefix_caching, default true].
    #[arg(long)]
    pub prefix_caching: Option<bool>,
    /// Speculative decoding: off or mtp [router.speculative, default off].
    #[arg(long)]
    pub speculative: Option<String>,
    /// Stop speculating for a sequence whose drafts are accepted less often than this, 0..1
    /// [router.speculative_min_acceptance, default 0.5; 0 = never].
    #[arg(long)]
    pub speculative_min_acceptance: Option<f64>,
}

impl Limits {
    pub fn apply(&self, o: &mut Overrides) {
        o.set_num("router.max_batch_tokens", self.max_batch_tokens);
        o.set_num("router.max_running", self.max_running);
        o.set_num("router.max_queue", self.max_queue);
        o.set_num("router.max_new_tokens", self.max_new_tokens);
        o.set_num("router.default_max_new_tokens", self.default_max_new_tokens);
        o.set_num("router.max_steps_in_flight", self.max_steps_in_flight);
        o.set("router.model_id", self.model_id.clone());
        o.set("router.metrics_listen", self.metrics_listen.clone());
        o.set("router.drain_timeout_secs", self.drain_timeout_secs);
        o.set("router.prefix_caching", self.prefix_caching);
        o.set("router.speculative", self.speculative.clone());
        o.set("router.speculative_min_acceptance", self.speculative_min_acceptance);
    }
}

/// Router options from settings, for `model` served by `stages`.
pub fn router_options(s: &Settings, stages: Vec<String>, model: &Path) -> anyhow::Result<RouterOptions> {
    let r = &s.router;
    let model_id = if r.model_id.is_empty() {
        model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "mlaserve".into())
    } else {
        r.model_id.clone()
    };
    Ok(RouterOptions {
        stages,
        max_batch_tokens: r.max_batch_tokens,
        max_running: r.max_running,
        max_queue: r.max_queue,
        max_steps_in_flight: r.max_steps_in_flight,
        max_new_tokens: r.max_new_tokens,
        default_max_new_tokens: r.default_max_new_tokens,
        max_input_tokens: r.max_input_tokens,
        max_stop_sequences: r.max_stop_sequences,
        max_request_bytes: r.max_request_bytes,
        drain_timeout: Duration::from_secs(r.drain_timeout_secs),
        prefix_caching: r.prefix_caching,
        speculative: r.speculative == "mtp",
        speculative_min_acceptance: r.speculative_min_acceptance,
        model_id,
        stage_tls: stage_tls(s)?,
        server_tls: server_tls(s)?,
        http_tls: http_tls(s)?,
        auth_token: auth_token(s)?,
        ..RouterOptions::default()
    })
}

pub fn run(a: Args, g: &Global) -> anyhow::Result<()> {
    let mut o = Overrides::default();
    o.set("router.model", a.model.as_ref().map(|p| p.display().to_string()));
    o.set("router.listen", a.listen.clone());
    if !a.stages.is_empty() {
        o.set("router.stages", Some(a.stages.clone()));
    }
    o.set("security.stage_token_file", a.stage_token_file.clone());
    o.set("router.http_listen", a.http_listen.clone());
    a.limits.apply(&mut o);
    let s = load(g, o)?;
    let model = PathBuf::from(required(&s.router.model, "router.model", "--model")?);
    if s.router.stages.is_empty() {
        anyhow::bail!("`router.stages` is required: pass --stage for each stage, set it in the config file, or set MLASERVE_ROUTER__STAGES");
    }
    // Reads TLS and token files, so that --check fails on a missing one as the real start would.
    let opts = router_options(&s, s.router.stages.clone(), &model)?;
    if check_done(g, &s, "router") {
        return Ok(());
    }
    let listen = s.router.listen.parse()?;
    runtime()?.block_on(async move {
        let telemetry = Telemetry::init(&s.telemetry, Role::Router)?;
        serve_metrics(&s.router.metrics_listen, &telemetry).await?;
        let http = http_listener(&s.router.http_listen).await?;
        let listener = bind(listen, "router").await?;
        mlaserve_router::serve(&model, opts, listener, http, &telemetry, shutdown_signal()).await?;
        telemetry.shutdown();
        Ok(())
    })
}

/// The OpenAI HTTP listener, when an address is configured.
pub async fn http_listener(addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(bind(addr.parse()?, "http").await?))
}

/// TLS for the HTTP port: the public port's certificate and key.
fn http_tls(s: &Settings) -> anyhow::Result<Option<std::sync::Arc<mlaserve_router::http::TlsConfig>>> {
    let c = &s.security;
    if c.tls_cert.is_empty() {
        return Ok(None);
    }
    let read = |p: &str| std::fs::read(p).map_err(|e| anyhow::anyhow!("security: cannot read {p}: {e}"));
    let cfg = mlaserve_router::http::http_tls(&read(&c.tls_cert)?, &read(&c.tls_key)?)
        .map_err(|e| anyhow::anyhow!("security: HTTP TLS: {e}"))?;
    Ok(Some(cfg))
}
