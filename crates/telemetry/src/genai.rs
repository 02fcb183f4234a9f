//! OpenTelemetry GenAI semantic-convention names and the instruments each role records.

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use opentelemetry::KeyValue;

pub const OPERATION_NAME: &str = "gen_ai.operation.name";
pub const PROVIDER_NAME: &str = "gen_ai.provider.name";
pub const REQUEST_MODEL: &str = "gen_ai.request.model";
pub const REQUEST_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
pub const REQUEST_TEMPERATURE: &str = "gen_ai.request.temperature";
pub const REQUEST_TOP_P: &str = "gen_ai.request.top_p";
pub const REQUEST_TOP_K: &str = "gen_ai.request.top_k";
pub const REQUEST_SEED: &str = "gen_ai.request.seed";
pub const RESPONSE_ID: &str = "gen_ai.response.id";
pub const RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
pub const USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
pub const USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";

/// Bucket boundaries from the GenAI metric conventions.
pub const TTFT_BUCKETS: [f64; 16] =
    [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
pub const TPOT_BUCKETS: [f64; 13] = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5];
pub const DURATION_BUCKETS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
/// Step durations are far shorter than requests: finer at the low end.
pub const STEP_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192,
    16.384,
];

/// The router's instruments.
#[derive(Clone)]
pub struct RouterMetrics {
    pub ttft: Histogram<f64>,
    pub tpot: Histogram<f64>,
    pub request_duration: Histogram<f64>,
    pub queue_duration: Histogram<f64>,
    pub step_duration: Histogram<f64>,
    pub prompt_tokens: Counter<u64>,
    pub generated_tokens: Counter<u64>,
    pub requests: Counter<u64>,
    pub preemptions: Counter<u64>,
    pub drafts: Counter<u64>,
    pub drafts_accepted: Counter<u64>,
    pub running: Gauge<u64>,
    pub waiting: Gauge<u64>,
    pub blocks_used: Gauge<u64>,
    pub blocks_free: Gauge<u64>,
    /// Attributes on every request metric (operation, provider, model).
    pub base: Vec<KeyValue>,
}

impl RouterMetrics {
    pub fn new(meter: &Meter, model: &str) -> Self {
        RouterMetrics {
            ttft: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description("Time from request arrival to the first generated token")
                .with_boundaries(TTFT_BUCKETS.to_vec())
                .build(),
            tpot: meter
                .f64_histogram("gen_ai.server.time_per_output_token")
                .with_unit("s")
                .with_description("Time per output token after the first")
                .with_boundaries(TPOT_BUCKETS.to_vec())
                .build(),
            request_duration: meter
                .f64_histogram("gen_ai.server.request.duration")
                .with_unit("s")
                .with_description("End-to-end request duration")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            queue_duration: meter
                .f64_histogram("mlaserve.request.queue.duration")
                .with_unit("s")
                .with_description("Time from arrival to the first scheduled step")
                .with_boundaries(TTFT_BUCKETS.to_vec())
                .build(),
            step_duration: meter
                .f64_histogram("mlaserve.step.duration")
                .with_unit("s")
                .with_description("Round trip of one step through the pipeline")
                .with_boundaries(STEP_BUCKETS.to_vec())
                .build(),
            prompt_tokens: meter
                .u64_counter("mlaserve.prompt.tokens")
                .with_description("Prompt tokens")
                .build(),
            generated_tokens: meter
                .u64_counter("mlaserve.generation.tokens")
                .with_description("Generated tokens")
                .build(),
            requests: meter.u64_counter("mlaserve.requests").with_description("Finished requests").build(),
            preemptions: meter
                .u64_counter("mlaserve.preemptions")
                .with_description("Sequences preempted for recompute")
                .build(),
            drafts: meter
                .u64_counter("mlaserve.speculative.drafts")
                .with_description("MTP drafts verified")
                .build(),
            drafts_accepted: meter
                .u64_counter("mlaserve.speculative.accepted")
                .with_description("MTP drafts accepted")
                .build(),
            running: meter
                .u64_gauge("mlaserve.sequences.running")
                .with_description("Running sequences")
                .build(),
            waiting: meter
                .u64_gauge("mlaserve.sequences.waiting")
                .with_description("Waiting sequences")
                .build(),
            blocks_used: meter
                .u64_gauge("mlaserve.kv_blocks.used")
                .with_description("Latent cache blocks in use")
                .build(),
            blocks_free: meter
                .u64_gauge("mlaserve.kv_blocks.free")
                .with_description("Free latent cache blocks")
                .build(),
            base: vec![
                KeyValue::new(OPERATION_NAME, "text_completion"),
                KeyValue::new(PROVIDER_NAME, "mlaserve"),
                KeyValue::new(REQUEST_MODEL, model.to_string()),
            ],
        }
    }
}

/// A worker's instruments.
#[derive(Clone)]
pub struct StageMetrics {
    pub forward_duration: Histogram<f64>,
    pub tokens: Counter<u64>,
    pub hidden_bytes: Counter<u64>,
    pub sent_bytes: Counter<u64>,
    pub active_sequences: Gauge<u64>,
    pub base: Vec<KeyValue>,
}

impl StageMetrics {
    pub fn new(meter: &Meter, layer_start: usize, layer_end: usize) -> Self {
        StageMetrics {
            forward_duration: meter
                .f64_histogram("mlaserve.stage.forward.duration")
                .with_unit("s")
                .with_description("Compute time of one step on this stage")
                .with_boundaries(STEP_BUCKETS.to_vec())
                .build(),
            tokens: meter.u64_counter("mlaserve.stage.tokens").with_description("Tokens processed").build(),
            hidden_bytes: meter
                .u64_counter("mlaserve.stage.hidden")
                .with_unit("By")
                .with_description("Hidden-state bytes sent to the next stage")
                .build(),
            sent_bytes: meter
                .u64_counter("mlaserve.stage.sent")
                .with_unit("By")
                .with_description(
                    "Encoded step-message bytes sent to the next stage (hidden states and framing)",
                )
                .build(),
            active_sequences: meter
                .u64_gauge("mlaserve.stage.sequences")
                .with_description("Sequences this stage tracks")
                .build(),
            base: vec![KeyValue::new("mlaserve.stage.layers", format!("{layer_start}..{layer_end}"))],
        }
    }
}
