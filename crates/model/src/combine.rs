//! How the expert shards' partial sums become one tensor on the stage's device.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use tch::{Device, Tensor};

use crate::error::Result;

#[derive(Clone)]
pub enum Combine {
    /// Copy each partial to the stage device and add: CPU shards, and a single device.
    Add,
    /// NCCL reduce onto the stage device's rank: CUDA shards of one process.
    #[cfg(feature = "cuda")]
    Nccl(Arc<crate::nccl::Comms>),
}

impl Combine {
    /// The combine for shards on `shards` feeding a stage on `main`: NCCL when there are several
    /// CUDA shards (and this build has the `cuda` feature), else copy-and-add.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn for_devices(main: Device, shards: &[Device]) -> Result<Combine> {
        #[cfg(feature = "cuda")]
        if shards.len() > 1 && shards.contains(&main) && shards.iter().all(|d| matches!(d, Device::Cuda(_))) {
            return Ok(Combine::Nccl(Arc::new(crate::nccl::Comms::new(shards)?)));
        }
        Ok(Combine::Add)
    }

    /// Sums the shards' partials (`[N, H]` on the shard's device, None where the shard had no
    /// tokens) onto `main`; zeros like `like` when no shard had any.
    pub fn sum(
        &self,
        partials: Vec<(Option<Tensor>, Device)>,
        main: Device,
        like: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Combine::Add => Ok(partials
                .into_iter()
                .filter_map(|(p, _)| p)
                .map(|p| p.to_device(main))
                .reduce(|a, b| a + b)
                .unwrap_or_else(|| like.zeros_like())),
            #[cfg(feature = "cuda")]
            Combine::Nccl(comms) => {
                // Every rank takes part in a collective, idle shards with zeros.
                let root = partials.iter().position(|(_, d)| *d == main).unwrap_or(0);
                let full: Vec<Tensor> = partials
                    .into_iter()
                    .map(|(p, d)| p.unwrap_or_else(|| Tensor::zeros(like.size(), (like.kind(), d))))
                    .collect();
                comms.reduce(full, root)
            }
        }
    }
}
