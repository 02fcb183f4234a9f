//! Observability for every mlaserve role: logs (text or JSON, with trace ids when tracing is on),
//! OpenTelemetry traces over OTLP/gRPC with W3C trace-context propagation, and metrics exported both
//! over OTLP and on a Prometheus `/metrics` endpoint. With no OTLP endpoint configured nothing is
//! exported and the tracing layer is not installed at all.

pub mod genai;
pub mod metrics_http;
pub mod propagation;

use std::time::Duration;

use mlaserve_core::settings::TelemetrySettings;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(e: E) -> TelemetryError {
    TelemetryError::Setup(e.to_string())
}

/// Which process this is; decides the default service name and resource attributes.
#[derive(Debug, Clone)]
pub enum Role {
    Router,
    Worker {
        layer_start: usize,
        layer_end: usize,
    },
    /// Short-lived commands (logits, generate, clients): logs only.
    Tool,
}

impl Role {
    fn default_service_name(&self) -> &'static str {
        match self {
            Role::Router => "mlaserve-router",
            Role::Worker { .. } => "mlaserve-worker",
            Role::Tool => "mlaserve",
        }
    }
}

/// Keeps the providers alive; flushes on drop.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: SdkMeterProvider,
    registry: prometheus::Registry,
    tracing_on: bool,
}

/// The OTLP endpoint in effect: the setting, else OTEL_EXPORTER_OTLP_ENDPOINT.
pub fn otlp_endpoint(s: &TelemetrySettings) -> Option<String> {
    if !s.otlp_endpoint.is_empty() {
        return Some(s.otlp_endpoint.clone());
    }
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.trim().is_empty())
}

fn resource(s: &TelemetrySettings, role: &Role) -> Resource {
    // The default builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut b = Resource::builder();
    let env_name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|v| !v.is_empty());
    if !s.service_name.is_empty() {
        b = b.with_service_name(s.service_name.clone());
    } else if env_name.is_none() {
        b = b.with_service_name(role.default_service_name());
    }
    let mut attrs = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    match role {
        Role::Router => attrs.push(KeyValue::new("mlaserve.role", "router")),
        Role::Worker { layer_start, layer_end } => {
            attrs.push(KeyValue::new("mlaserve.role", "worker"));
            attrs.push(KeyValue::new("mlaserve.stage.layer_start", *layer_start as i64));
            attrs.push(KeyValue::new("mlaserve.stage.layer_end", *layer_end as i64));
            attrs.push(KeyValue::new("mlaserve.stage.layers", format!("{layer_start}..{layer_end}")));
        }
        Role::Tool => attrs.push(KeyValue::new("mlaserve.role", "tool")),
    }
    for kv in s.resource_attributes.split(',').filter_map(|p| p.split_once('=')) {
        attrs.push(KeyValue::new(kv.0.trim().to_string(), kv.1.trim().to_string()));
    }
    b.with_attributes(attrs).build()
}

impl Telemetry {
    /// Installs the global subscriber, propagator and meter provider. Must run inside a tokio
    /// runtime when an OTLP endpoint is configured (the exporters use it).
    pub fn init(s: &TelemetrySettings, role: Role) -> Result<Telemetry, TelemetryError> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let endpoint = otlp_endpoint(s);
        let res = resource(s, &role);

        let registry = prometheus::Registry::new();
        let prom =
            opentelemetry_prometheus::exporter().with_registry(registry.clone()).build().map_err(setup)?;
        let mut mb = SdkMeterProvider::builder().with_reader(prom).with_resource(res.clone());
        if let Some(ep) = &endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(ep.clone())
                .build()
                .map_err(setup)?;
            mb = mb.with_reader(
                PeriodicReader::builder(exporter)
                    .with_interval(Duration::from_secs(s.metrics_export_interval_secs))
                    .build(),
            );
        }
        let meter = mb.build();
        opentelemetry::global::set_meter_provider(meter.clone());

        let tracer = match &endpoint {
            Some(ep) if !matches!(role, Role::Tool) => {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(ep.clone())
                    .build()
                    .map_err(setup)?;
                Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(res).build())
            }
            _ => None,
        };

        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(if s.log_level.is_empty() { "info" } else { &s.log_level }))
            .map_err(|e| TelemetryError::Setup(format!("`telemetry.log_level`: {e}")))?;
        let json = s.log_format == "json";
        let fmt_layer = if json {
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed()
        };
        let otel_layer = tracer.as_ref().map(|p| {
            opentelemetry::global::set_tracer_provider(p.clone());
            tracing_opentelemetry::layer().with_tracer(p.tracer("mlaserve"))
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(otel_layer)
            .with(fmt_layer)
            .try_init()
            .map_err(setup)?;
        Ok(Telemetry { tracing_on: tracer.is_some(), tracer, meter, registry })
    }

    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn tracing_enabled(&self) -> bool {
        self.tracing_on
    }

    pub fn registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    pub fn meter(&self, name: &'static str) -> opentelemetry::metrics::Meter {
        use opentelemetry::metrics::MeterProvider as _;
        self.meter.meter(name)
    }

    /// Flushes pending spans and metrics.
    pub fn shutdown(&self) {
        if let Some(t) = &self.tracer {
            let _ = t.force_flush();
            let _ = t.shutdown();
        }
        let _ = self.meter.force_flush();
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}
