use mlaserve_core::ConfigError;

/// Everything that can go wrong loading or running the model. Messages name the tensor, field or
/// sequence involved so that a worker can pass them to its caller unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("checkpoint file {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("checkpoint lacks tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    #[error("invalid layer range {start}..{end}: {message}")]
    LayerRange { start: usize, end: usize, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cache: {0}")]
    Cache(String),
    #[error("nccl: {0}")]
    Nccl(String),
    #[error("decode step check: {0}")]
    Check(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn input_err(msg: impl Into<String>) -> ModelError {
    ModelError::Input(msg.into())
}
