use mlaserve_model::ModelError;
use tonic::{Code, Status};

/// A failed step or call, with the gRPC code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub code: Code,
    pub message: String,
}

impl StageError {
    pub fn invalid(message: impl Into<String>) -> Self {
        StageError { code: Code::InvalidArgument, message: message.into() }
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        StageError { code: Code::FailedPrecondition, message: message.into() }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        StageError { code: Code::Unavailable, message: message.into() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        StageError { code: Code::Internal, message: message.into() }
    }
}

impl From<ModelError> for StageError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Input(m) => StageError::invalid(m),
            ModelError::Cache(m) => StageError::failed_precondition(m),
            other => StageError::internal(other.to_string()),
        }
    }
}

impl From<tch::TchError> for StageError {
    fn from(e: tch::TchError) -> Self {
        StageError::internal(format!("libtorch: {e}"))
    }
}

impl From<StageError> for Status {
    fn from(e: StageError) -> Self {
        Status::new(e.code, e.message)
    }
}
