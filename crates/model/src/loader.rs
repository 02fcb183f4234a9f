//! Load-time options and the small context every module's `load` reads its tensors through. Below the
//! modules it loads: it imports none of them (attention reads its `PrefillForm` from here).

use std::ops::Range;

use mlaserve_core::ModelConfig;
use tch::{Device, Kind, Tensor};

use crate::combine::Combine;
use crate::dtype::DType;
use crate::error::Result;
use crate::norm::RmsNorm;
use crate::weights::Checkpoint;

/// How a long prefill chunk attends. Both forms read the same latent cache and compute the same
/// function; `Auto` picks the cheaper one per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillForm {
    #[default]
    Auto,
    Absorbed,
    Expanded,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Decoder layers this process holds (a pipeline stage); None = all.
    pub layers: Option<Range<usize>>,
    /// Load the MTP module (only on the stage that holds the last layer, when the checkpoint has one).
    pub mtp: bool,
    /// Devices the routed experts are split over; empty = all on `device`.
    pub expert_devices: Vec<Device>,
    pub prefill_form: PrefillForm,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            layers: None,
            mtp: false,
            expert_devices: vec![],
            prefill_form: PrefillForm::Auto,
        }
    }
}

pub(crate) struct LoadCtx<'a> {
    pub ck: &'a Checkpoint,
    pub config: &'a ModelConfig,
    pub kind: Kind,
    pub device: Device,
    pub prefill_form: PrefillForm,
    /// Devices the routed experts are split over, and how their partial sums are combined.
    pub expert_devices: Vec<Device>,
    pub combine: Combine,
}

impl LoadCtx<'_> {
    /// A weight in the compute precision on the stage's device.
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.ck.load_shaped(name, shape, self.kind)?.to_device(self.device))
    }

    /// A weight kept in fp32 whatever the compute precision (router gate and correction bias).
    pub fn weight_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.ck.load_shaped(name, shape, Kind::Float)?.to_device(self.device))
    }

    pub fn norm(&self, name: &str, dim: usize) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.weight(name, &[dim])?, self.config.rms_norm_eps))
    }
}
