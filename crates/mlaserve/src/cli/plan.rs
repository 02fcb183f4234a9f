//! `mlaserve plan`: where a deployment of a checkpoint puts its weights, what its latent cache costs
//! per token, how many tokens fit, and whether it fits at all. Reads config.json and, when the weight
//! files are present, their safetensors headers (never the weights). The logic is in
//! `mlaserve_core::plan`; this file parses flags and prints.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use mlaserve_core::byte_size::{format_gib, parse_bytes};
use mlaserve_core::plan::{
    self, CacheDtype, Component, Deployment, MemoryPlan, StagePlan, StoredFormats, WeightFormat,
    RUNTIME_RESERVE_BYTES,
};
use mlaserve_core::ModelConfig;

fn size(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory: config.json, and the safetensors headers when present (which tensors
    /// are FP8); without weight files the DeepSeek-V3 convention is assumed.
    #[arg(long)]
    model: PathBuf,
    /// Nodes; one pipeline stage per node unless --stages says otherwise.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Devices per node: a stage's routed experts are split over them (its expert shards).
    #[arg(long, default_value_t = 1)]
    gpus_per_node: usize,
    /// Memory of each device: 141GB (powers of 1000), 140GiB (powers of 1024), MB, MiB, TB, or bytes.
    /// Without it, only weights and cache per token are reported.
    #[arg(long, value_parser = size)]
    gpu_memory: Option<u64>,
    /// How the workers will hold weights: native (as stored; FP8 stays FP8 with its scales), bf16, f32.
    #[arg(long, default_value = "native")]
    weights: WeightFormat,
    /// Pipeline stages (default: one per node); a multiple of --nodes, sharing out each node's devices.
    #[arg(long)]
    stages: Option<usize>,
    /// Latent cache type: the workers' --dtype (bf16 or f32).
    #[arg(long, default_value = "bf16")]
    dtype: CacheDtype,
    /// Tokens per cache block (the workers' --block-size).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Memory kept free on each device for the runtime (default 8GiB: CUDA context, NCCL, allocator
    /// slack, a step's activations, a layer's dequantisation buffer).
    #[arg(long, value_parser = size)]
    reserve: Option<u64>,
    /// Print the plan as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let c = ModelConfig::from_dir(&a.model)?;
    let formats = StoredFormats::from_dir(&a.model, &c)
        .with_context(|| format!("reading the safetensors headers in {}", a.model.display()))?;
    let d = Deployment {
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        stages: a.stages,
        device_memory: a.gpu_memory,
        reserve: a.reserve.unwrap_or(RUNTIME_RESERVE_BYTES),
        weights: a.weights,
        cache_dtype: a.dtype,
        block_size: a.block_size,
    };
    let p = plan::plan(&c, &formats, &d)?;
    let text = if a.json { serde_json::to_string_pretty(&p)? + "\n" } else { render(&a, &c, &p) };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// A parameter count: 671.03B, 3.92B, 15.1K.
fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn yes(fits: Option<bool>) -> &'static str {
    match fits {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "unknown (give --gpu-memory)",
    }
}

fn render(a: &Args, c: &ModelConfig, p: &MemoryPlan) -> String {
    let mut s = String::new();
    let stored: Vec<String> =
        p.params.by_stored_format.iter().map(|(f, n)| format!("{f} {}", count(*n))).collect();
    s += &format!("plan for {}\n", a.model.display());
    s += &format!(
        "  model: {}, {} layers{}, {} + {} (MTP) parameters stored\n",
        p.model_type,
        c.num_hidden_layers,
        if c.has_mtp() { " + MTP" } else { "" },
        count(p.params.main),
        count(p.params.mtp),
    );
    s += &format!("  stored as: {}; formats from {}\n", stored.join(", "), p.params.formats_from);
    s += &format!(
        "  weights: {}, {} GiB in all; latent cache {}, {} bytes per token over all stages\n",
        p.weights,
        gib(p.weight_bytes),
        p.cache_dtype,
        p.latent_cache_bytes_per_token
    );
    s += &format!(
        "  deployment: {} node(s) x {} device(s){}; {} stage(s) of {} device(s); reserve {} per device\n",
        p.nodes,
        p.gpus_per_node,
        p.device_memory_bytes
            .map(|m| format!(" of {:.2} GB = {}", m as f64 / 1e9, format_gib(m)))
            .unwrap_or_default(),
        p.num_stages,
        p.devices_per_stage,
        format_gib(p.runtime_reserve_bytes)
    );
    for st in &p.stages {
        s += &render_stage(st, p.block_size);
    }
    s += "\n";
    if let (Some(cap), Some(ctx)) = (p.kv_capacity_tokens, p.max_context_tokens) {
        s += &format!(
            "KV capacity {cap} tokens ({} blocks of {}); longest context {ctx} tokens (max_position_embeddings {})\n",
            p.kv_blocks.unwrap_or(0),
            p.block_size,
            p.max_position_embeddings
        );
    }
    for problem in &p.problems {
        s += &format!("  - {problem}\n");
    }
    s += &format!("fits: {}\n", yes(p.fits));
    s
}

fn render_stage(st: &StagePlan, block_size: usize) -> String {
    let mut parts = vec![format!("layers {}..{}", st.layers.start, st.layers.end)];
    for (on, what) in [(st.embeddings, "embeddings"), (st.lm_head, "lm_head"), (st.mtp, "MTP")] {
        if on {
            parts.push(what.into());
        }
    }
    let mut s = format!(
        "\nstage {} (node {}): {}; latent cache {} layers, {} bytes per token, on device 0\n",
        st.stage,
        st.node,
        parts.join(" + "),
        st.cache_layers,
        st.latent_cache_bytes_per_token
    );
    let mut header = format!("  {:<6} {:<9}", "device", "experts");
    for comp in Component::ALL {
        header += &format!(" {:>w$}", comp.name(), w = comp.name().len().max(8));
    }
    s += &format!("{header} {:>8} {:>8}   (GiB)\n", "weights", "free");
    for d in &st.devices {
        let mut row = format!("  {:<6} {:<9}", d.device, format!("{}..{}", d.experts.start, d.experts.end));
        for comp in Component::ALL {
            let b = d.weight_bytes_by_component.get(&comp).copied().unwrap_or(0);
            row += &format!(" {:>w$}", gib(b), w = comp.name().len().max(8));
        }
        let free =
            d.free_bytes.map(|f| format!("{:.2}", f as f64 / (1u64 << 30) as f64)).unwrap_or("-".into());
        s += &format!("{row} {:>8} {:>8}\n", gib(d.weight_bytes), free);
    }
    if let (Some(cap), Some(ctx)) = (st.kv_capacity_tokens, st.max_context_tokens) {
        s += &format!(
            "  KV capacity {cap} tokens ({} blocks of {block_size}); longest context {ctx}; fits: {}\n",
            st.kv_blocks.unwrap_or(0),
            yes(st.fits)
        );
    }
    s
}
