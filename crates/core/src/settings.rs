//! Layered configuration for every mlaserve role: built-in defaults, then a TOML file (`--config`),
//! then environment variables `MLASERVE_<SECTION>__<KEY>` (e.g. `MLASERVE_ROUTER__MAX_QUEUE=64`,
//! lists comma-separated), then command-line flags. Invalid values are rejected at start with a
//! message naming the key. `mlaserve config` prints the effective result.

use std::net::SocketAddr;
use std::path::Path;

use config::{Config, Environment, File, FileFormat, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn bad(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key: key.to_string(), message: message.into() }
}

/// All settings; each section is read by the role it names (`serve` also reads `router`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub router: RouterSettings,
    pub worker: WorkerSettings,
    pub serve: ServeSettings,
    pub telemetry: TelemetrySettings,
    pub security: SecuritySettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterSettings {
    /// Model directory (config.json and tokenizer files; weights are not read). Required.
    pub model: String,
    /// Public gRPC address.
    pub listen: String,
    /// OpenAI-compatible HTTP address (`/v1/chat/completions`, ...); empty = off.
    pub http_listen: String,
    /// Pipeline stage addresses in layer order. Required for `router`.
    pub stages: Vec<String>,
    /// New tokens per step across all sequences (prefill chunks plus one per decode).
    pub max_batch_tokens: usize,
    /// Sequences running (holding cache blocks) at once.
    pub max_running: usize,
    /// Requests waiting for admission; beyond it RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Steps in flight at once; 0 = one per pipeline stage (`mlaserve serve`, whose stages share
    /// one machine's cores: one at a time).
    pub max_steps_in_flight: usize,
    /// Largest `max_new_tokens` a request may ask for (also bounded by the context and the cache
    /// pool); the default covers long reasoning traces.
    pub max_new_tokens: usize,
    /// `max_new_tokens` for requests that leave it unset (capped by the context left).
    pub default_max_new_tokens: usize,
    /// Longest prompt in tokens; 0 = the context only.
    pub max_input_tokens: usize,
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
    /// Largest request message in bytes.
    pub max_request_bytes: usize,
    /// Model name reported by ModelInfo and in telemetry; empty = the model directory's name.
    pub model_id: String,
    /// Reuse the latent cache of shared prompt prefixes across requests.
    pub prefix_caching: bool,
    /// Speculative decoding: "off", or "mtp" (the checkpoint's MTP module drafts one token per step,
    /// verified in the same forward; requests with penalties do not speculate).
    pub speculative: String,
    /// A sequence stops speculating when, after 16 drafts, fewer than this share were accepted
    /// (a draft that is rarely right costs more than it saves); 0 = never stop.
    pub speculative_min_acceptance: f64,
    /// Prometheus `/metrics` HTTP address; empty = off.
    pub metrics_listen: String,
    /// Seconds in-flight streams may take to finish after SIGTERM before the router exits.
    pub drain_timeout_secs: u64,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            model: String::new(),
            listen: "0.0.0.0:50051".into(),
            http_listen: String::new(),
            stages: vec![],
            max_batch_tokens: 512,
            max_running: 256,
            max_queue: 1024,
            max_steps_in_flight: 0,
            max_new_tokens: 32768,
            default_max_new_tokens: 256,
            max_input_tokens: 0,
            max_stop_sequences: 8,
            max_request_bytes: 4 << 20,
            model_id: String::new(),
            prefix_caching: true,
            speculative: "off".into(),
            speculative_min_acceptance: 0.5,
            metrics_listen: String::new(),
            drain_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Checkpoint directory. Required.
    pub model: String,
    /// Decoder layers of this stage, "START..END" (END exclusive). Required.
    pub layers: String,
    /// Internal gRPC address.
    pub listen: String,
    /// Devices the routed experts of each MoE layer are split over.
    pub expert_shards: usize,
    /// "cpu" or "cuda".
    pub device: String,
    /// "auto" (bf16 on cuda, f32 on cpu), "f32" or "bf16".
    pub dtype: String,
    /// How matrix weights are held: "native" (as stored: FP8 stays FP8 with its block scales),
    /// "bf16" or "f32" (converted at load). `dtype` is the activation/compute type.
    pub weights: String,
    /// Blocks in this stage's latent cache; 0 = sized by `kv_cache_memory`, or 1024 without it.
    /// An explicit count overrides `kv_cache_memory`.
    pub kv_blocks: usize,
    /// Memory for the latent cache: a fraction in (0, 1] of the memory free after the weights are
    /// loaded (host memory on cpu, device memory on cuda), or a size such as "8GiB"; empty = off.
    pub kv_cache_memory: String,
    /// Token slots per cache block (all stages must agree).
    pub block_size: usize,
    /// Prometheus `/metrics` HTTP address; empty = off.
    pub metrics_listen: String,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            model: String::new(),
            layers: String::new(),
            listen: "0.0.0.0:50061".into(),
            expert_shards: 1,
            device: "cpu".into(),
            dtype: "auto".into(),
            weights: "native".into(),
            kv_blocks: 0,
            kv_cache_memory: String::new(),
            block_size: 16,
            metrics_listen: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeSettings {
    /// Checkpoint directory; empty = the trained demo model.
    pub model: String,
    /// Public gRPC address.
    pub listen: String,
    /// OpenAI-compatible HTTP address; empty = off.
    pub http_listen: String,
    /// Pipeline stages (worker processes) on this machine.
    pub stages: usize,
    pub expert_shards: usize,
    pub device: String,
    pub dtype: String,
    /// As `worker.weights`, for every stage.
    pub weights: String,
    /// As `worker.kv_blocks` and `worker.kv_cache_memory`, for every stage.
    pub kv_blocks: usize,
    pub kv_cache_memory: String,
    pub block_size: usize,
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            model: String::new(),
            listen: "127.0.0.1:50051".into(),
            http_listen: "127.0.0.1:8000".into(),
            stages: 1,
            expert_shards: 1,
            device: "cpu".into(),
            dtype: "auto".into(),
            weights: "native".into(),
            kv_blocks: 0,
            kv_cache_memory: String::new(),
            block_size: 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OTLP/gRPC collector endpoint (e.g. "http://collector:4317"); empty = OTEL_EXPORTER_OTLP_ENDPOINT,
    /// and nothing is exported when neither is set.
    pub otlp_endpoint: String,
    /// service.name; empty = OTEL_SERVICE_NAME, else "mlaserve-router" / "mlaserve-worker".
    pub service_name: String,
    /// Extra resource attributes "k=v,k=v", added to OTEL_RESOURCE_ATTRIBUTES.
    pub resource_attributes: String,
    /// "text" (human-readable) or "json".
    pub log_format: String,
    /// Log filter, as RUST_LOG (which wins when set).
    pub log_level: String,
    /// Seconds between OTLP metric exports.
    pub metrics_export_interval_secs: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: String::new(),
            service_name: String::new(),
            resource_attributes: String::new(),
            log_format: "text".into(),
            log_level: "info".into(),
            metrics_export_interval_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySettings {
    /// PEM certificate chain and key of this server (public port for the router, internal port for
    /// workers); both empty = plaintext.
    pub tls_cert: String,
    pub tls_key: String,
    /// PEM CA that client certificates must chain to (workers: mutual TLS); empty = no client auth.
    pub tls_client_ca: String,
    /// Router → worker connections: CA to verify workers with, and this router's client certificate.
    pub stage_ca: String,
    pub stage_client_cert: String,
    pub stage_client_key: String,
    /// Server name expected in worker certificates; empty = the host of each stage address.
    pub stage_server_name: String,
    /// File holding the bearer token required on the public API; empty = no auth (unless the
    /// environment variable named by `auth_token_env` is set).
    pub auth_token_file: String,
    /// Environment variable holding the bearer token (default MLASERVE_AUTH_TOKEN).
    pub auth_token_env: String,
    /// File holding the shared stage token: workers accept `Stage` calls only with it, the router
    /// (and each stage towards the next) sends it. Empty = stages are open (use mutual TLS or a
    /// network policy instead).
    pub stage_token_file: String,
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 1] = ["router.stages"];

impl Settings {
    /// Defaults < `file` < environment (`env`, normally `std::env::vars()`) < `overrides`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, Value)],
    ) -> Result<Settings, SettingsError> {
        let load = |e: config::ConfigError| SettingsError::Load(e.to_string());
        let defaults = Config::try_from(&Settings::default()).map_err(load)?;
        let mut b = Config::builder().add_source(defaults);
        if let Some(f) = file {
            if !f.exists() {
                return Err(SettingsError::Load(format!("config file {} does not exist", f.display())));
            }
            b = b.add_source(File::from(f).format(FileFormat::Toml).required(true));
        }
        // Only MLASERVE_<SECTION>__<KEY>: other MLASERVE_* variables (MLASERVE_THREADS...) are not settings.
        let vars: config::Map<String, String> =
            env.into_iter().filter(|(k, _)| k.starts_with("MLASERVE_") && k.contains("__")).collect();
        let mut envsrc = Environment::with_prefix("MLASERVE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars));
        envsrc = envsrc.list_separator(",");
        for k in LIST_KEYS {
            envsrc = envsrc.with_list_parse_key(k);
        }
        b = b.add_source(envsrc);
        for (k, v) in overrides {
            b = b.set_override(k.as_str(), v.clone()).map_err(load)?;
        }
        let s: Settings = b.build().map_err(load)?.try_deserialize().map_err(load)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let addr = |key: &str, v: &str, optional: bool| -> Result<(), SettingsError> {
            if optional && v.is_empty() {
                return Ok(());
            }
            v.parse::<SocketAddr>()
                .map(|_| ())
                .map_err(|_| bad(key, format!("{v:?} is not an IP:port address")))
        };
        let positive = |key: &str, v: usize| if v == 0 { Err(bad(key, "must be positive")) } else { Ok(()) };
        let r = &self.router;
        addr("router.listen", &r.listen, false)?;
        addr("router.http_listen", &r.http_listen, true)?;
        addr("router.metrics_listen", &r.metrics_listen, true)?;
        positive("router.max_batch_tokens", r.max_batch_tokens)?;
        positive("router.max_running", r.max_running)?;
        positive("router.max_queue", r.max_queue)?;
        positive("router.max_new_tokens", r.max_new_tokens)?;
        positive("router.default_max_new_tokens", r.default_max_new_tokens)?;
        positive("router.max_request_bytes", r.max_request_bytes)?;
        if r.default_max_new_tokens > r.max_new_tokens {
            return Err(bad("router.default_max_new_tokens", "exceeds router.max_new_tokens"));
        }
        if !matches!(r.speculative.as_str(), "off" | "mtp") {
            return Err(bad(
                "router.speculative",
                format!("must be \"off\" or \"mtp\", got {:?}", r.speculative),
            ));
        }
        if !(0.0..=1.0).contains(&r.speculative_min_acceptance) {
            return Err(bad(
                "router.speculative_min_acceptance",
                format!("must be within 0..=1, got {}", r.speculative_min_acceptance),
            ));
        }
        if let Some(s) = r.stages.iter().find(|s| s.trim().is_empty() || s.contains(char::is_whitespace)) {
            return Err(bad("router.stages", format!("{s:?} is not a host:port address")));
        }
        let w = &self.worker;
        addr("worker.listen", &w.listen, false)?;
        addr("worker.metrics_listen", &w.metrics_listen, true)?;
        if !w.layers.is_empty() {
            parse_layers(&w.layers).map_err(|m| bad("worker.layers", m))?;
        }
        positive("worker.expert_shards", w.expert_shards)?;
        parse_kv_cache_memory(&w.kv_cache_memory).map_err(|m| bad("worker.kv_cache_memory", m))?;
        positive("worker.block_size", w.block_size)?;
        device("worker.device", &w.device)?;
        dtype("worker.dtype", &w.dtype)?;
        weights("worker.weights", &w.weights)?;
        let s = &self.serve;
        addr("serve.listen", &s.listen, false)?;
        addr("serve.http_listen", &s.http_listen, true)?;
        positive("serve.stages", s.stages)?;
        positive("serve.expert_shards", s.expert_shards)?;
        parse_kv_cache_memory(&s.kv_cache_memory).map_err(|m| bad("serve.kv_cache_memory", m))?;
        positive("serve.block_size", s.block_size)?;
        device("serve.device", &s.device)?;
        dtype("serve.dtype", &s.dtype)?;
        weights("serve.weights", &s.weights)?;
        let t = &self.telemetry;
        if !matches!(t.log_format.as_str(), "text" | "json") {
            return Err(bad(
                "telemetry.log_format",
                format!("must be \"text\" or \"json\", got {:?}", t.log_format),
            ));
        }
        if !t.otlp_endpoint.is_empty() && !t.otlp_endpoint.contains("://") {
            return Err(bad("telemetry.otlp_endpoint", "must be a URL such as http://collector:4317"));
        }
        if t.metrics_export_interval_secs == 0 {
            return Err(bad("telemetry.metrics_export_interval_secs", "must be positive"));
        }
        for kv in t.resource_attributes.split(',').filter(|s| !s.trim().is_empty()) {
            if !kv.contains('=') {
                return Err(bad("telemetry.resource_attributes", format!("{kv:?} is not key=value")));
            }
        }
        let sec = &self.security;
        if sec.tls_cert.is_empty() != sec.tls_key.is_empty() {
            return Err(bad("security.tls_key", "tls_cert and tls_key must be set together"));
        }
        if sec.stage_client_cert.is_empty() != sec.stage_client_key.is_empty() {
            return Err(bad(
                "security.stage_client_key",
                "stage_client_cert and stage_client_key go together",
            ));
        }
        Ok(())
    }

    /// The effective settings as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }
}

fn device(key: &str, v: &str) -> Result<(), SettingsError> {
    match v {
        "cpu" | "cuda" => Ok(()),
        _ => Err(bad(key, format!("must be \"cpu\" or \"cuda\", got {v:?}"))),
    }
}

fn dtype(key: &str, v: &str) -> Result<(), SettingsError> {
    match v {
        "auto" | "f32" | "bf16" => Ok(()),
        _ => Err(bad(key, format!("must be \"auto\", \"f32\" or \"bf16\", got {v:?}"))),
    }
}

fn weights(key: &str, v: &str) -> Result<(), SettingsError> {
    v.parse::<crate::WeightFormat>().map(|_| ()).map_err(|m| bad(key, m))
}

/// How much memory the latent cache may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheMemory {
    /// Share of the memory free after loading the weights.
    Fraction(f64),
    Bytes(u64),
}

/// Blocks in the cache when neither `kv_blocks` nor `kv_cache_memory` is given.
pub const DEFAULT_KV_BLOCKS: usize = 1024;

/// Parses `kv_cache_memory`: "" (off), a fraction in (0, 1] such as "0.9", or a size with a unit.
pub fn parse_kv_cache_memory(s: &str) -> Result<Option<KvCacheMemory>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(f) = s.parse::<f64>() {
        return if f > 0.0 && f <= 1.0 {
            Ok(Some(KvCacheMemory::Fraction(f)))
        } else {
            Err(format!("{s:?}: a bare number is a fraction in (0, 1]; write a size with a unit, e.g. 8GiB"))
        };
    }
    match crate::byte_size::parse_bytes(s) {
        Ok(0) => Err("must be positive".into()),
        Ok(b) => Ok(Some(KvCacheMemory::Bytes(b))),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses "START..END" (END exclusive, non-empty).
pub fn parse_layers(s: &str) -> Result<std::ops::Range<usize>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("expected START..END, got {s:?}"))?;
    let start: usize = a.trim().parse().map_err(|_| format!("bad layer start {a:?}"))?;
    let end: usize = b.trim().parse().map_err(|_| format!("bad layer end {b:?}"))?;
    if start >= end {
        return Err(format!("empty layer range {s:?}"));
    }
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_memory_is_a_fraction_or_a_size() {
        assert_eq!(parse_kv_cache_memory(""), Ok(None));
        assert_eq!(parse_kv_cache_memory("0.9"), Ok(Some(KvCacheMemory::Fraction(0.9))));
        assert_eq!(parse_kv_cache_memory("1"), Ok(Some(KvCacheMemory::Fraction(1.0))));
        assert_eq!(parse_kv_cache_memory("8GiB"), Ok(Some(KvCacheMemory::Bytes(8 << 30))));
        assert!(parse_kv_cache_memory("0").is_err());
        assert!(parse_kv_cache_memory("1.5").is_err());
        assert!(parse_kv_cache_memory("0GiB").is_err());
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let s = Settings::load(None, vec![], &[]).unwrap();
        assert_eq!(s, Settings::default());
        assert!(s.to_toml().contains("max_queue = 1024"));
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("mlaserve-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[router]\nmax_queue = 10\nmax_running = 20\nmax_batch_tokens = 30\n").unwrap();
        let e = env(&[
            ("MLASERVE_ROUTER__MAX_RUNNING", "21"),
            ("MLASERVE_ROUTER__MAX_BATCH_TOKENS", "31"),
            ("MLASERVE_ROUTER__STAGES", "a:1,b:2"),
            ("MLASERVE_THREADS", "3"),
        ]);
        let flags = vec![("router.max_batch_tokens".to_string(), Value::from(32i64))];
        let s = Settings::load(Some(&f), e, &flags).unwrap();
        assert_eq!(s.router.max_queue, 10, "file beats default");
        assert_eq!(s.router.max_running, 21, "env beats file");
        assert_eq!(s.router.max_batch_tokens, 32, "flag beats env");
        assert_eq!(s.router.stages, vec!["a:1", "b:2"]);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases: Vec<(Vec<(String, String)>, &str)> = vec![
            (env(&[("MLASERVE_ROUTER__MAX_QUEUE", "0")]), "router.max_queue"),
            (env(&[("MLASERVE_ROUTER__MAX_QUEUE", "lots")]), "max_queue"),
            (env(&[("MLASERVE_WORKER__LAYERS", "4..2")]), "worker.layers"),
            (env(&[("MLASERVE_WORKER__DEVICE", "tpu")]), "worker.device"),
            (env(&[("MLASERVE_ROUTER__LISTEN", "nowhere")]), "router.listen"),
            (env(&[("MLASERVE_TELEMETRY__LOG_FORMAT", "xml")]), "telemetry.log_format"),
            (env(&[("MLASERVE_ROUTER__MAX_QEUE", "3")]), "max_qeue"),
            (env(&[("MLASERVE_WORKER__KV_CACHE_MEMORY", "2")]), "worker.kv_cache_memory"),
            (env(&[("MLASERVE_SERVE__KV_CACHE_MEMORY", "lots")]), "serve.kv_cache_memory"),
        ];
        for (e, key) in cases {
            let err = Settings::load(None, e.clone(), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{e:?}: {err}");
        }
    }
}
