//! Router limits and batching knobs. Defaults are what `mlaserve router` uses without settings.

use std::time::Duration;

use mlaserve_proto::transport::ClientTls;

/// Drafts a sequence verifies before its acceptance rate may end its speculation.
pub const SPECULATION_PROBATION: u32 = 16;

#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Stage addresses in layer order.
    pub stages: Vec<String>,
    /// New tokens per step across all sequences (prefill chunks plus one per decode).
    pub max_batch_tokens: usize,
    /// Sequences running (holding cache blocks) at once.
    pub max_running: usize,
    /// Requests waiting for admission; beyond it new requests get RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Steps (micro-batches) in flight at once; 0 = one per pipeline stage.
    pub max_steps_in_flight: usize,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens: usize,
    /// `max_new_tokens` when a request does not set it (capped by the context left).
    pub default_max_new_tokens: usize,
    /// Largest prompt in tokens (0 = limited only by the context).
    pub max_input_tokens: usize,
    pub max_stop_sequences: usize,
    pub max_stop_length: usize,
    /// Largest encoded request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Reuse cached latent blocks of shared prompt prefixes.
    pub prefix_caching: bool,
    /// Speculative decoding with the MTP module as the draft (when the last stage holds it).
    pub speculative: bool,
    /// A sequence stops speculating when, after [`SPECULATION_PROBATION`] drafts, fewer than this
    /// share were accepted; 0 = never.
    pub speculative_min_acceptance: f64,
    /// Free blocks kept back when admitting new sequences, so running ones can grow.
    pub admission_watermark_blocks: usize,
    /// Pause between reconnection attempts when the pipeline is down.
    pub reconnect_interval: Duration,
    /// After SIGTERM: how long in-flight streams may take to finish.
    pub drain_timeout: Duration,
    pub model_id: String,
    /// TLS for the connections to the stages (mutual TLS with a client identity).
    pub stage_tls: ClientTls,
    /// TLS on the public port.
    pub server_tls: Option<tonic::transport::ServerTlsConfig>,
    /// TLS on the HTTP port (the same certificate and key).
    pub http_tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Bearer token required on the public API (health and reflection stay open).
    pub auth_token: Option<String>,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            stages: vec![],
            max_batch_tokens: 512,
            max_running: 256,
            max_queue: 1024,
            max_steps_in_flight: 0,
            max_new_tokens: 32768,
            default_max_new_tokens: 256,
            max_input_tokens: 0,
            max_stop_sequences: 8,
            max_stop_length: 256,
            max_request_bytes: 4 << 20,
            prefix_caching: true,
            speculative: false,
            speculative_min_acceptance: 0.5,
            admission_watermark_blocks: 1,
            reconnect_interval: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(30),
            model_id: "mlaserve".into(),
            stage_tls: ClientTls::default(),
            server_tls: None,
            http_tls: None,
            auth_token: None,
        }
    }
}
