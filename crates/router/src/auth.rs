//! Bearer-token authentication of the public API. Health and reflection stay open.

use tonic::{Request, Status};

/// Accepts requests carrying `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Vec<u8>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        BearerAuth { expected: token.map(|t| format!("Bearer {t}").into_bytes()) }
    }

    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let Some(expected) = &self.expected else { return Ok(req) };
        let given = req.metadata().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, expected) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }
}

/// Comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let auth = BearerAuth::new(Some("s3cret".into()));
        let mut ok = Request::new(());
        ok.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check(ok).is_ok());
        let mut bad = Request::new(());
        bad.metadata_mut().insert("authorization", "Bearer s3creT".parse().unwrap());
        assert_eq!(auth.check(bad).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(auth.check(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(BearerAuth::new(None).check(Request::new(())).is_ok());
    }
}
