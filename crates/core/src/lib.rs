//! Facts about a DeepSeek-V3-architecture checkpoint and the paged cache geometry that both the router
//! (which schedules) and the workers (which compute) must agree on, and the memory plan of a
//! deployment. Nothing here links libtorch.

pub mod blocks;
pub mod byte_size;
pub mod model_config;
pub mod plan;
pub mod rope_scaling;
pub mod sampling;
pub mod sched;
pub mod settings;
#[cfg(test)]
mod test_configs;

pub use blocks::{BlockAllocator, BlockError};
pub use model_config::{ConfigError, ModelConfig, Quantization, RopeLayout, RopeScaling};
pub use plan::{Deployment, MemoryPlan, PlanError, WeightFormat};
pub use sampling::SamplingParams;
pub use settings::{Settings, SettingsError};
