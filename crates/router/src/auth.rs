//! Bearer-token authentication of the public API (health and reflection stay open), and the
//! remapping of oversize-request statuses.

pub use mlaserve_proto::auth::BearerAuth;

/// tonic answers an oversized request with OUT_OF_RANGE; gRPC's convention (and other servers) use
/// RESOURCE_EXHAUSTED. Rewrites that one trailers-only response.
pub fn remap_oversize<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let oversize = resp.headers().get("grpc-status").is_some_and(|v| v == "11")
        && resp.headers().get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| {
            m.contains("message%20length%20too%20large") || m.contains("message length too large")
        });
    if oversize {
        resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}
