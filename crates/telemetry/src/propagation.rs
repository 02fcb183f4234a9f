//! W3C trace context across processes: from the client's gRPC metadata into the router, and from the
//! router into every stage inside each step message.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use tonic::metadata::MetadataMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct MapExtractor<'a>(&'a HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The caller's trace context (`traceparent`, `tracestate`) from gRPC request metadata.
pub fn extract_metadata(md: &MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(md)))
}

/// The trace context of `span` as carrier entries (for a step message).
pub fn inject_span(span: &tracing::Span) -> HashMap<String, String> {
    let cx = span.context();
    let mut map = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MapCarrier(&mut map)));
    map
}

pub fn extract_map(map: &HashMap<String, String>) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapExtractor(map)))
}

/// Makes `span` a child of the remote context `cx` (no-op when it carries no valid span).
pub fn set_remote_parent(span: &tracing::Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of the span identified by `sc` (e.g. another process's or request's).
pub fn set_parent_span(span: &tracing::Span, sc: &opentelemetry::trace::SpanContext) {
    if sc.is_valid() {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc.clone()));
    }
}

/// Links `span` to the spans of other traces (a step serves many requests).
pub fn add_links(span: &tracing::Span, contexts: &[opentelemetry::trace::SpanContext]) {
    for sc in contexts.iter().filter(|c| c.is_valid()) {
        span.add_link(sc.clone());
    }
}

/// The OpenTelemetry span context of a tracing span.
pub fn span_context(span: &tracing::Span) -> opentelemetry::trace::SpanContext {
    span.context().span().span_context().clone()
}

/// Records the span's trace id in its `trace_id` field, so log lines inside it carry it.
pub fn record_trace_id(span: &tracing::Span) {
    let sc = span_context(span);
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}
