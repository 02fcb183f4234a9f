//! Prometheus text exposition on `GET /metrics`.

use std::net::SocketAddr;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, TextEncoder};

use crate::TelemetryError;

/// Serves `/metrics` for `registry` on `addr` in the background; returns the bound address.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
) -> Result<SocketAddr, TelemetryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| TelemetryError::Setup(format!("metrics endpoint {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| TelemetryError::Setup(e.to_string()))?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut buf = Vec::new();
                let enc = TextEncoder::new();
                match enc.encode(&registry.gather(), &mut buf) {
                    Ok(()) => ([(CONTENT_TYPE, enc.format_type().to_string())], buf).into_response(),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics endpoint stopped: {e}");
        }
    });
    Ok(local)
}
