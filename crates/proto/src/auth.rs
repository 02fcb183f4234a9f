//! Bearer-token checks, for the public API (clients) and the stage port (the router and the
//! previous stage, with the shared stage token).

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
        if self.accepts(req.metadata().get("authorization").map(|v| v.as_bytes())) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }

    /// Whether an `authorization` header value (gRPC metadata or HTTP) passes.
    pub fn accepts(&self, given: Option<&[u8]>) -> bool {
        match &self.expected {
            None => true,
            Some(expected) => constant_time_eq(given.unwrap_or_default(), expected),
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
