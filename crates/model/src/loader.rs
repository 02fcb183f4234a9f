//! Load-time options and the small context every module's `load` reads its tensors through. Below the
//! modules it loads: it imports none of them (attention reads its `PrefillForm` from here).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;

use mlaserve_core::{ModelConfig, WeightFormat};
use tch::{Device, Kind, Tensor};

use crate::combine::Combine;
use crate::dtype::DType;
use crate::error::Result;
use crate::linear::Weight;
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
    /// How the matrix weights are held (`--weights`): as stored, or converted to bf16 / f32.
    pub weights: WeightFormat,
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
            weights: WeightFormat::Native,
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
    pub weights: WeightFormat,
    /// Bytes of matrix weights loaded so far, by held format (for the load report).
    pub held: RefCell<BTreeMap<&'static str, u64>>,
}

impl LoadCtx<'_> {
    /// A weight in the compute precision on the stage's device.
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.ck.load_shaped(name, shape, self.kind)?.to_device(self.device))
    }

    /// A matrix weight `[out, in]` held as `--weights` says: `native` keeps FP8 as FP8 with its
    /// block scales and, on the CPU (whose kernels read bf16 directly, exactly), bf16 as bf16;
    /// other tensors, and everything on a GPU (libtorch's products want one dtype), take the
    /// compute dtype, so no weight is held wider than it is stored or computed. `bf16` / `f32`
    /// convert.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let w = self.matrix_uncounted(name, shape)?;
        self.count_held(&w);
        Ok(w)
    }

    /// [`LoadCtx::matrix`] without adding it to the load report (for a weight that is reshaped
    /// first, whose parts are counted with [`LoadCtx::count_held`]).
    pub fn matrix_uncounted(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let on_cpu = self.device == Device::Cpu;
        let w = match self.weights {
            WeightFormat::Native => match self.ck.load_native(name, shape)? {
                Weight::Dense(t) if !(on_cpu && t.kind() == Kind::BFloat16) => {
                    Weight::Dense(t.to_kind(self.kind))
                }
                w => w,
            },
            WeightFormat::Bf16 => Weight::Dense(self.ck.load_shaped(name, shape, Kind::BFloat16)?),
            WeightFormat::F32 => Weight::Dense(self.ck.load_shaped(name, shape, Kind::Float)?),
        };
        Ok(w.to_device(self.device))
    }

    /// Adds a held matrix weight to the load report, by format.
    pub fn count_held(&self, w: &Weight) {
        let label = match w {
            Weight::Fp8 { .. } => "fp8",
            Weight::Dense(t) if t.kind() == Kind::BFloat16 => "bf16",
            Weight::Dense(t) if t.kind() == Kind::Float => "f32",
            Weight::Dense(_) => "other",
        };
        *self.held.borrow_mut().entry(label).or_default() += w.bytes() as u64;
    }

    /// A weight kept in fp32 whatever the compute precision (router gate and correction bias).
    pub fn weight_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.ck.load_shaped(name, shape, Kind::Float)?.to_device(self.device))
    }

    pub fn norm(&self, name: &str, dim: usize) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.weight(name, &[dim])?, self.config.rms_norm_eps))
    }
}
