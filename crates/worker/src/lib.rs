//! A pipeline stage of mlaserve: holds a contiguous range of decoder layers and its share of the
//! latent cache, runs steps sent by the router (or the previous stage), forwards hidden states to the
//! next stage and, on the last stage, samples. Inside the stage the routed experts of each MoE layer
//! may be split over several shards (devices) whose partial outputs are combined.

pub mod compute;
pub mod error;
pub mod head;
pub mod hidden;
pub mod registry;
pub mod server;
pub mod service;

pub use error::StageError;
pub use server::{serve, DeviceKind, WorkerOptions};
