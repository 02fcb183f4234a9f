//! Facts about a DeepSeek-V3-architecture checkpoint and the paged cache geometry that both the router
//! (which schedules) and the workers (which compute) must agree on. Nothing here links libtorch.

pub mod blocks;
pub mod model_config;
pub mod sampling;
pub mod settings;

pub use blocks::{BlockAllocator, BlockError};
pub use model_config::{ConfigError, ModelConfig, Quantization, RopeLayout, RopeScaling};
pub use sampling::SamplingParams;
pub use settings::{Settings, SettingsError};
