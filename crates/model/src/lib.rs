//! DeepSeek-V3 on libtorch: checkpoint loading (bf16/fp32/FP8), Multi-head Latent Attention over a
//! paged latent cache, DeepSeekMoE, the MTP module and token sampling. No networking: workers drive
//! [`Model`] step by step through [`StepPlan`]s.

pub mod absorb;
pub mod attention;
pub mod batch;
pub mod cache;
pub mod combine;
#[cfg(feature = "cuda")]
pub mod device_memory;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod gemm_choice;
mod host_step;
pub use host_step::checked_steps;
mod grouped_experts;
mod huge_pages;
pub mod kernels;
pub mod layer;
pub mod linear;
pub mod loader;
mod mla_kernels;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod norm;
/// The kernels' fork-join pool (it lives with the kernels).
pub use mlaserve_kernels::pool;
pub mod profile;
pub mod rope;
pub mod routing;
pub mod sampling;
pub mod speculative;
pub mod torch_bf16;
pub mod weights;

pub use batch::{SeqStep, StepPlan};
pub use cache::LatentCache;
pub use dtype::DType;
pub use engine::{Engine, EngineRequest, EngineStats};
pub use error::{ModelError, Result};
pub use loader::{LoadOptions, PrefillForm};
pub use model::Model;
pub use sampling::{SampleOutput, Sampler};
