//! The memory plan of a deployment (`mlaserve plan`): for N nodes of G devices with M bytes each, the
//! layers of each pipeline stage (the cost-balanced split of `plan/stages.rs`), the bytes of weights
//! on each device by component (`plan/inventory.rs`, stored formats from `plan/stored.rs`), the latent
//! cache per token, hence the KV capacity in tokens and the longest context one sequence can reach.
//!
//! Placement follows the worker: a stage's attention, dense MLPs, routers, shared experts, norms,
//! embedding, lm_head, the MTP module's non-expert tensors and the whole latent cache live on its
//! device 0; the routed experts of each layer (the MTP layer's too) are split evenly over the stage's
//! devices (shard s holds experts s*E/G .. (s+1)*E/G), as `moe.rs` loads them. One stage per node by
//! default; `stages` may be a multiple of the nodes, the node's devices then shared out between them.

mod inventory;
mod stages;
mod stored;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

use crate::byte_size::{format_gib, format_gib_signed};
use crate::model_config::ModelConfig;
pub use inventory::{checkpoint_tensors, stage_tensors, Component, Placement, Role, TensorSpec};
pub use stored::{Stored, StoredFormats, WeightFormat};

/// Memory each device keeps free of weights and cache (default of `mlaserve plan --reserve`): the CUDA
/// context and NCCL's buffers (1-2 GiB together), the caching allocator's slack, a step's activations
/// (at the router's default 512 batch tokens well under 1 GiB for DeepSeek-V3), and room for one
/// layer's weights dequantised to bf16 where the FP8 path must dequantise (32 experts of a DeepSeek-V3
/// layer: 2.6 GiB). An estimate with headroom, not a measurement; the same ~8 GiB docs/deploy.md uses.
pub const RUNTIME_RESERVE_BYTES: u64 = 8 << 30;

/// A plan fits only if every stage can also cache at least this many tokens (one 4K-token sequence):
/// weights that fit with no room for a useful cache do not make a deployment.
pub const MIN_KV_TOKENS: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Header { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl PlanError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        PlanError::Io { path: path.display().to_string(), source }
    }

    fn header(path: &Path, message: impl Into<String>) -> Self {
        PlanError::Header { path: path.display().to_string(), message: message.into() }
    }
}

/// The type of the latent cache (the workers' `--dtype`: activations and cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    #[default]
    Bf16,
    F32,
}

impl CacheDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            CacheDtype::Bf16 => 2,
            CacheDtype::F32 => 4,
        }
    }
}

impl FromStr for CacheDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" | "bfloat16" => Ok(CacheDtype::Bf16),
            "f32" | "float32" => Ok(CacheDtype::F32),
            _ => Err(format!("cache dtype {s:?}: expected bf16 or f32")),
        }
    }
}

impl fmt::Display for CacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheDtype::Bf16 => "bf16",
            CacheDtype::F32 => "f32",
        })
    }
}

/// What to plan for.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub nodes: usize,
    pub gpus_per_node: usize,
    /// Pipeline stages; None = one per node.
    pub stages: Option<usize>,
    /// Memory of each device; None = report weights and cache per token only.
    pub device_memory: Option<u64>,
    pub reserve: u64,
    pub weights: WeightFormat,
    pub cache_dtype: CacheDtype,
    /// Tokens per cache block (the workers' `--block-size`).
    pub block_size: usize,
}

impl Default for Deployment {
    fn default() -> Self {
        Deployment {
            nodes: 1,
            gpus_per_node: 1,
            stages: None,
            device_memory: None,
            reserve: RUNTIME_RESERVE_BYTES,
            weights: WeightFormat::Native,
            cache_dtype: CacheDtype::Bf16,
            block_size: 16,
        }
    }
}

/// Parameters the checkpoint stores (the MTP module's copies of embedding and head included).
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub main: u64,
    pub mtp: u64,
    pub total: u64,
    /// Parameters per stored format, e.g. {"bf16": ..., "fp8-e4m3-128x128": ..., "f32": ...}.
    pub by_stored_format: BTreeMap<String, u64>,
    /// Where the stored formats come from: the safetensors headers or the config convention.
    pub formats_from: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    /// Index within the stage (the worker's `cuda:<device>`).
    pub device: usize,
    /// Routed experts this device holds in every MoE layer of the stage.
    pub experts: Range<usize>,
    pub weight_bytes: u64,
    pub weight_bytes_by_component: BTreeMap<Component, u64>,
    /// Whether the stage's latent cache lives here (device 0).
    pub latent_cache: bool,
    /// memory - reserve - weights (negative when the weights do not fit); None without a memory size.
    pub free_bytes: Option<i64>,
    pub fits: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    pub stage: usize,
    pub node: usize,
    pub layers: Range<usize>,
    pub embeddings: bool,
    pub lm_head: bool,
    pub mtp: bool,
    pub weight_bytes: u64,
    pub weight_bytes_by_component: BTreeMap<Component, u64>,
    /// Layers with a latent cache here (the MTP layer has its own).
    pub cache_layers: usize,
    /// `cache_layers x (kv_lora_rank + qk_rope_head_dim) x` cache dtype bytes.
    pub latent_cache_bytes_per_token: u64,
    pub kv_blocks: Option<u64>,
    pub kv_capacity_tokens: Option<u64>,
    pub max_context_tokens: Option<u64>,
    pub fits: Option<bool>,
    pub devices: Vec<DevicePlan>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub model_type: String,
    pub weights: WeightFormat,
    pub params: Params,
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub num_stages: usize,
    pub devices_per_stage: usize,
    pub device_memory_bytes: Option<u64>,
    pub runtime_reserve_bytes: u64,
    pub min_kv_tokens: u64,
    pub cache_dtype: CacheDtype,
    pub block_size: usize,
    pub weight_bytes: u64,
    pub weight_bytes_by_component: BTreeMap<Component, u64>,
    /// Over all stages: what one cached token costs the whole pipeline.
    pub latent_cache_bytes_per_token: u64,
    /// The smallest stage's figures: every stage caches every token.
    pub kv_blocks: Option<u64>,
    pub kv_capacity_tokens: Option<u64>,
    pub max_position_embeddings: usize,
    pub max_context_tokens: Option<u64>,
    pub fits: Option<bool>,
    /// Why it does not fit, one line per device or stage short of memory.
    pub problems: Vec<String>,
    pub stages: Vec<StagePlan>,
}

fn zero_components() -> BTreeMap<Component, u64> {
    Component::ALL.iter().map(|&c| (c, 0)).collect()
}

fn add_components(into: &mut BTreeMap<Component, u64>, from: &BTreeMap<Component, u64>) {
    for (c, b) in from {
        *into.entry(*c).or_insert(0) += b;
    }
}

/// Whether the MTP layer is MoE (DeepSeek-V3's is; the loader decides by its router gate): dense only
/// when the headers show its dense MLP.
fn mtp_is_moe(c: &ModelConfig, formats: &StoredFormats) -> bool {
    formats.contains(&format!("model.layers.{}.mlp.gate_proj.weight", c.num_hidden_layers)) != Some(true)
}

/// Parameter counts of the checkpoint, by part and by stored format.
pub fn checkpoint_params(c: &ModelConfig, formats: &StoredFormats) -> Params {
    let (mut main, mut mtp) = (0, 0);
    let mut by_stored_format = BTreeMap::new();
    for t in checkpoint_tensors(c, mtp_is_moe(c, formats)) {
        let n = t.numel();
        if t.component == Component::Mtp {
            mtp += n;
        } else {
            main += n;
        }
        *by_stored_format.entry(formats.stored(&t).label()).or_insert(0) += n;
    }
    Params { main, mtp, total: main + mtp, by_stored_format, formats_from: formats.source() }
}

/// Checks the deployment's shape; returns (stages, devices per stage).
fn shape(c: &ModelConfig, d: &Deployment) -> Result<(usize, usize), PlanError> {
    let bad = |m: String| Err(PlanError::Invalid(m));
    if d.nodes == 0 || d.gpus_per_node == 0 || d.block_size == 0 {
        return bad("--nodes, --gpus-per-node and --block-size must be positive".into());
    }
    let p = d.stages.unwrap_or(d.nodes);
    if p == 0 || p > c.num_hidden_layers {
        return bad(format!("--stages must be between 1 and the model's {} layers", c.num_hidden_layers));
    }
    if !p.is_multiple_of(d.nodes) {
        return bad(format!(
            "--stages {p} must be a multiple of --nodes {} (a stage cannot span nodes)",
            d.nodes
        ));
    }
    let per_node = p / d.nodes;
    if !d.gpus_per_node.is_multiple_of(per_node) {
        return bad(format!(
            "{per_node} stages per node cannot share {} devices evenly (--gpus-per-node)",
            d.gpus_per_node
        ));
    }
    let g = d.gpus_per_node / per_node;
    if g > c.n_routed_experts {
        return bad(format!("{g} expert shards per stage exceed the {} routed experts", c.n_routed_experts));
    }
    Ok((p, g))
}

/// Plans `d` for the model `c` whose tensors are stored as `formats` says.
pub fn plan(c: &ModelConfig, formats: &StoredFormats, d: &Deployment) -> Result<MemoryPlan, PlanError> {
    let (p, g) = shape(c, d)?;
    let ranges = c.balanced_stages(p).expect("stage count checked");
    let e = c.n_routed_experts;
    let shard_of: Vec<usize> = (0..e).map(|j| (0..g).find(|&s| j < (s + 1) * e / g).unwrap_or(0)).collect();
    let mtp_moe = mtp_is_moe(c, formats);
    let elt = d.cache_dtype.size_in_bytes() as u64;
    let mut problems = Vec::new();
    let mut stages = Vec::with_capacity(p);
    for (s, range) in ranges.into_iter().enumerate() {
        let (first, last) = (range.start == 0, range.end == c.num_hidden_layers);
        let mut per_device = vec![zero_components(); g];
        for t in stage_tensors(c, range.clone(), mtp_moe) {
            let dev = match t.placement {
                Placement::Main => 0,
                Placement::Expert(j) => shard_of[j],
            };
            *per_device[dev].entry(t.component).or_insert(0) += formats.resident_bytes(&t, d.weights);
        }
        let mtp = last && c.has_mtp();
        let cache_layers = range.len() + usize::from(mtp);
        let per_token = (cache_layers * c.latent_dim()) as u64 * elt;
        let mut devices = Vec::with_capacity(g);
        for (i, comps) in per_device.into_iter().enumerate() {
            let weight_bytes: u64 = comps.values().sum();
            let free = d.device_memory.map(|m| m as i64 - d.reserve as i64 - weight_bytes as i64);
            if let (Some(f), Some(m)) = (free, d.device_memory) {
                if f < 0 {
                    problems.push(format!(
                        "stage {s} device {i}: {} of weights + {} reserve exceed {}",
                        format_gib(weight_bytes),
                        format_gib(d.reserve),
                        format_gib(m)
                    ));
                }
            }
            devices.push(DevicePlan {
                device: i,
                experts: (i * e / g)..((i + 1) * e / g),
                weight_bytes,
                weight_bytes_by_component: comps,
                latent_cache: i == 0,
                free_bytes: free,
                fits: free.map(|f| f >= 0),
            });
        }
        let kv_blocks = devices[0].free_bytes.map(|f| f.max(0) as u64 / (per_token * d.block_size as u64));
        let capacity = kv_blocks.map(|b| b * d.block_size as u64);
        let weights_fit = devices.iter().all(|x| x.fits != Some(false));
        if let (Some(cap), true) = (capacity, weights_fit) {
            if cap < MIN_KV_TOKENS {
                problems.push(format!(
                    "stage {s}: room for {cap} cached tokens ({} free on device 0), fewer than {MIN_KV_TOKENS}",
                    format_gib_signed(devices[0].free_bytes.unwrap_or(0))
                ));
            }
        }
        let mut by_component = zero_components();
        for x in &devices {
            add_components(&mut by_component, &x.weight_bytes_by_component);
        }
        stages.push(StagePlan {
            stage: s,
            node: s * d.nodes / p,
            layers: range,
            embeddings: first,
            lm_head: last,
            mtp,
            weight_bytes: devices.iter().map(|x| x.weight_bytes).sum(),
            weight_bytes_by_component: by_component,
            cache_layers,
            latent_cache_bytes_per_token: per_token,
            kv_blocks,
            kv_capacity_tokens: capacity,
            max_context_tokens: capacity.map(|t| t.min(c.max_position_embeddings as u64)),
            fits: capacity.map(|t| weights_fit && t >= MIN_KV_TOKENS),
            devices,
        });
    }
    let mut by_component = zero_components();
    for st in &stages {
        add_components(&mut by_component, &st.weight_bytes_by_component);
    }
    let kv_blocks = stages.iter().filter_map(|s| s.kv_blocks).min();
    let capacity = kv_blocks.map(|b| b * d.block_size as u64);
    Ok(MemoryPlan {
        model_type: c.model_type.clone(),
        weights: d.weights,
        params: checkpoint_params(c, formats),
        nodes: d.nodes,
        gpus_per_node: d.gpus_per_node,
        num_stages: p,
        devices_per_stage: g,
        device_memory_bytes: d.device_memory,
        runtime_reserve_bytes: d.reserve,
        min_kv_tokens: MIN_KV_TOKENS,
        cache_dtype: d.cache_dtype,
        block_size: d.block_size,
        weight_bytes: stages.iter().map(|s| s.weight_bytes).sum(),
        weight_bytes_by_component: by_component,
        latent_cache_bytes_per_token: stages.iter().map(|s| s.latent_cache_bytes_per_token).sum(),
        kv_blocks,
        kv_capacity_tokens: capacity,
        max_position_embeddings: c.max_position_embeddings,
        max_context_tokens: capacity.map(|t| t.min(c.max_position_embeddings as u64)),
        fits: d.device_memory.map(|_| stages.iter().all(|s| s.fits == Some(true))),
        problems,
        stages,
    })
}

#[cfg(test)]
mod tests;
