//! The paged latent cache of one stage: per held layer (and the MTP layer) a pool of
//! `num_blocks * block_size` slots of `kv_lora_rank + qk_rope_head_dim` values.

use tch::{Device, Kind, Tensor};

pub struct LatentCache {
    block_size: usize,
    num_blocks: usize,
    latent_dim: usize,
    pub(crate) layers: Vec<Tensor>,
    pub(crate) mtp: Option<Tensor>,
}

impl LatentCache {
    pub(crate) fn new(
        layers: usize,
        mtp: bool,
        num_blocks: usize,
        block_size: usize,
        latent_dim: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        let make =
            || crate::huge_pages::zeros(&[(num_blocks * block_size) as i64, latent_dim as i64], kind, device);
        LatentCache {
            block_size,
            num_blocks,
            latent_dim,
            layers: (0..layers).map(|_| make()).collect(),
            mtp: mtp.then(make),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Values stored per token across all layers held (the "latent cache per token").
    pub fn values_per_token(&self) -> usize {
        self.latent_dim * (self.layers.len() + usize::from(self.mtp.is_some()))
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().chain(self.mtp.iter()).map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum()
    }
}

/// Blocks that fit in `bytes` for a stage holding `layers` layers (plus MTP) of width `latent_dim`.
pub fn blocks_for_bytes(
    bytes: usize,
    layers: usize,
    mtp: bool,
    block_size: usize,
    latent_dim: usize,
    elt: usize,
) -> usize {
    let per_block = block_size * latent_dim * elt * (layers + usize::from(mtp));
    bytes / per_block.max(1)
}
