//! A pipeline stage of the model: a contiguous range of decoder layers, plus the embedding when it
//! holds layer 0 and the final norm, lm_head and MTP module when it holds the last layer. A stage
//! over all layers is the whole model.

use std::ops::Range;
use std::path::Path;

use mlaserve_core::ModelConfig;
use tch::{Device, Tensor};

use crate::batch::{SeqStep, StepPlan};
use crate::cache::LatentCache;
use crate::combine::Combine;
use crate::dtype::DType;
use crate::error::{input_err, ModelError, Result};
use crate::host_step::StepForm;
use crate::layer::DecoderLayer;
use crate::linear::Linear;
use crate::loader::{LoadCtx, LoadOptions};
use crate::mtp::Mtp;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::Checkpoint;

pub struct Model {
    config: ModelConfig,
    dtype: DType,
    device: Device,
    layer_range: Range<usize>,
    embed: Option<Tensor>,
    layers: Vec<DecoderLayer>,
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    mtp: Option<Mtp>,
    rope: Rope,
    expert_shards: usize,
    weights_held: String,
    /// Which layers take the host form of a decode step (`host_step`), decided once.
    host_ready: std::sync::OnceLock<Vec<bool>>,
}

/// `native (fp8 612.0 MB, bf16 67.1 MB)`.
fn held_report(
    format: mlaserve_core::WeightFormat,
    held: &std::collections::BTreeMap<&'static str, u64>,
) -> String {
    let parts: Vec<String> = held.iter().map(|(k, b)| format!("{k} {:.1} MB", *b as f64 / 1e6)).collect();
    format!("{format} ({})", parts.join(", "))
}

impl Model {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let config = ModelConfig::from_dir(dir)?;
        Self::load_with_config(dir, config, opts)
    }

    pub fn load_with_config(dir: &Path, config: ModelConfig, opts: &LoadOptions) -> Result<Model> {
        let n = config.num_hidden_layers;
        let range = opts.layers.clone().unwrap_or(0..n);
        if range.start >= range.end || range.end > n {
            return Err(ModelError::LayerRange {
                start: range.start,
                end: range.end,
                message: format!("must be a non-empty range within 0..{n}"),
            });
        }
        let first = range.start == 0;
        let last = range.end == n;
        let want_mtp = opts.mtp && last && config.has_mtp();

        let mut ck = Checkpoint::open(dir, config.quantization.clone())?;
        let in_stage = |name: &str| -> bool {
            if let Some(rest) = name.strip_prefix("model.layers.") {
                let idx: usize = rest.split('.').next().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
                range.contains(&idx) || (want_mtp && idx == n)
            } else {
                (first && name.starts_with("model.embed_tokens"))
                    || (last && (name.starts_with("model.norm") || name.starts_with("lm_head")))
            }
        };
        let total = ck.bytes_matching(in_stage);
        ck.start_progress(total, &format!("loading layers {}..{}", range.start, range.end));

        let kind = opts.dtype.kind();
        let expert_devices =
            if opts.expert_devices.is_empty() { vec![opts.device] } else { opts.expert_devices.clone() };
        let ctx = LoadCtx {
            ck: &ck,
            config: &config,
            kind,
            device: opts.device,
            prefill_form: opts.prefill_form,
            combine: Combine::for_devices(opts.device, &expert_devices)?,
            expert_devices,
            weights: opts.weights,
            held: Default::default(),
        };
        let expert_shards = ctx.expert_devices.len();
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = if first { Some(ctx.weight("model.embed_tokens.weight", &[v, h])?) } else { None };
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            layers.push(DecoderLayer::load(&ctx, i, config.is_moe_layer(i))?);
        }
        for i in 1..layers.len() {
            let next = layers[i].first_weights().iter().map(|w| w.shallow_clone()).collect();
            layers[i - 1].set_then(next);
        }
        let (norm, lm_head) = if last {
            let mut head = if config.tie_word_embeddings && !ck.contains("lm_head.weight") {
                ctx.matrix("model.embed_tokens.weight", &[v, h])?
            } else {
                ctx.matrix("lm_head.weight", &[v, h])?
            };
            crate::huge_pages::pack(head.tensors_mut());
            if let Some(l) = layers.last_mut() {
                l.set_then(vec![head.shallow_clone()]);
            }
            (Some(ctx.norm("model.norm.weight", h)?), Some(Linear::from_weight(head)))
        } else {
            (None, None)
        };
        let mtp = if want_mtp { Some(Mtp::load(&ctx, n, embed.as_ref())?) } else { None };
        let weights_held = held_report(opts.weights, &ctx.held.borrow());
        drop(ctx);
        ck.finish_progress();
        let kernel =
            if opts.device == Device::Cpu { crate::kernels::isa::selected().name() } else { "libtorch" };
        let huge_pages = if opts.device != Device::Cpu {
            "n/a".to_string()
        } else if !crate::huge_pages::enabled() {
            "off (MLASERVE_HUGE_PAGES=0)".to_string()
        } else {
            match crate::huge_pages::report() {
                Some((mode, bytes)) => format!("{:.1} MB (THP {mode})", bytes as f64 / 1e6),
                None => "unknown".to_string(),
            }
        };
        tracing::info!(
            layers = ?range,
            dtype = %opts.dtype,
            weights = %weights_held,
            kernel,
            huge_pages = %huge_pages,
            cpu_features = %crate::kernels::isa::cpu_features(),
            mtp = mtp.is_some(),
            expert_shards,
            "model stage loaded"
        );
        Ok(Model {
            rope: Rope::new(&config, opts.device),
            config,
            dtype: opts.dtype,
            device: opts.device,
            layer_range: range,
            embed,
            layers,
            norm,
            lm_head,
            mtp,
            expert_shards,
            weights_held,
            host_ready: Default::default(),
        })
    }

    /// How the matrix weights are held, e.g. `native (fp8 612.0 MB, bf16 67.1 MB)`.
    pub fn weights_held(&self) -> &str {
        &self.weights_held
    }

    /// The product kernels this stage runs: the CPU kernel path, or `libtorch` on a GPU.
    pub fn kernel(&self) -> &'static str {
        if self.device == Device::Cpu {
            crate::kernels::isa::selected().name()
        } else {
            "libtorch"
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn layer_range(&self) -> Range<usize> {
        self.layer_range.clone()
    }

    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.lm_head.is_some()
    }

    pub fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    pub fn expert_shards(&self) -> usize {
        self.expert_shards
    }

    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// A latent cache for this stage's layers (and its MTP layer).
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> LatentCache {
        LatentCache::new(
            self.layers.len(),
            self.mtp.is_some(),
            num_blocks,
            block_size,
            self.config.latent_dim(),
            self.dtype.kind(),
            self.device,
        )
    }

    pub fn plan(&self, seqs: Vec<SeqStep>, cache: &LatentCache) -> Result<StepPlan> {
        StepPlan::new(
            seqs,
            cache.block_size(),
            cache.num_slots(),
            &self.rope,
            self.dtype.kind(),
            self.device,
            None,
        )
    }

    fn validate_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(input_err(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<Tensor> {
        self.validate_ids(ids)?;
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        Ok(Tensor::from_slice(&ids).to_device(self.device))
    }

    /// Input embeddings `[T, H]` (first stage only).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let table = self
            .embed
            .as_ref()
            .ok_or_else(|| input_err("this stage does not hold the embedding (layer 0)"))?;
        if table.device() == Device::Cpu && table.is_contiguous() {
            // The rows copied on the host: one fresh tensor, not an index tensor and a gather (the
            // first libtorch calls of a decode step are its coldest).
            self.validate_ids(ids)?;
            let (hidden, elt) = (self.config.hidden_size, table.kind().elt_size_in_bytes());
            let out = Tensor::empty([ids.len() as i64, hidden as i64], (table.kind(), Device::Cpu));
            let row = hidden * elt;
            // SAFETY: `table` is a contiguous CPU tensor of `[vocab, hidden]` (checked at load), ids
            // are below vocab (checked above); `out` is fresh and contiguous, ids.len() such rows.
            unsafe {
                let (src, dst) = (table.data_ptr() as *const u8, out.data_ptr() as *mut u8);
                for (i, &t) in ids.iter().enumerate() {
                    std::ptr::copy_nonoverlapping(src.add(t as usize * row), dst.add(i * row), row);
                }
            }
            return Ok(out);
        }
        Ok(table.index_select(0, &self.check_ids(ids)?))
    }

    /// Runs this stage's layers over hidden states `[T, H]`.
    pub fn forward_layers(&self, hidden: Tensor, plan: &StepPlan, cache: &mut LatentCache) -> Result<Tensor> {
        let size = hidden.size();
        if size.len() != 2 || size[0] != plan.total_tokens as i64 || size[1] != self.config.hidden_size as i64
        {
            return Err(input_err(format!(
                "hidden states have shape {size:?}, expected [{}, {}]",
                plan.total_tokens, self.config.hidden_size
            )));
        }
        let _guard = tch::no_grad_guard();
        let mode = crate::host_step::mode();
        if mode != StepForm::Tensor {
            let saved: Option<Vec<Tensor>> =
                (mode == StepForm::Check).then(|| cache.layers.iter().map(Tensor::copy).collect());
            if let Some(out) = self.forward_layers_host(&hidden, plan, cache) {
                let Some(saved) = saved else { return Ok(out) };
                let host_cache = std::mem::replace(&mut cache.layers, saved);
                let want = self.forward_layers_tensor(&hidden, plan, cache);
                crate::host_step::check(&out, &want, &host_cache, &cache.layers)?;
                return Ok(want);
            }
        }
        Ok(self.forward_layers_tensor(&hidden, plan, cache))
    }

    /// The layers in their tensor form.
    fn forward_layers_tensor(&self, hidden: &Tensor, plan: &StepPlan, cache: &mut LatentCache) -> Tensor {
        let mut x = hidden.to_kind(self.dtype.kind());
        // Each layer's FFN output joins the stream in the next layer's input norm.
        let mut pending: Option<Tensor> = None;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (h, f) = layer.forward_split(&x, pending.as_ref(), plan, c);
            (x, pending) = (h, Some(f));
        }
        match pending {
            Some(f) => x + f,
            None => x,
        }
    }

    /// [`Model::forward_layers`] in the host form (`host_step`) when the step, the stage and its
    /// cache take it; None otherwise (nothing computed).
    fn forward_layers_host(
        &self,
        hidden: &Tensor,
        plan: &StepPlan,
        cache: &mut LatentCache,
    ) -> Option<Tensor> {
        let kind = self.dtype.kind();
        if !crate::host_step::plan_fits(plan) || self.device != Device::Cpu {
            return None;
        }
        let ready = self.host_ready.get_or_init(|| self.layers.iter().map(|l| l.host_ready(kind)).collect());
        let cache_ok = |c: &Tensor| c.kind() == kind && c.is_contiguous();
        if !ready.iter().any(|&r| r) || !cache.layers.iter().all(cache_ok) || hidden.device() != Device::Cpu {
            return None;
        }
        match kind {
            tch::Kind::BFloat16 => Some(self.host_layers::<u16>(hidden, plan, cache, ready)),
            tch::Kind::Float => Some(self.host_layers::<f32>(hidden, plan, cache, ready)),
            _ => None,
        }
    }

    /// The layers on host rows; a layer the host form does not take (`ready` false: FP8 dense
    /// MLP's split gate and up, say) runs its tensor form between two conversions.
    fn host_layers<T: crate::host_step::HostAct>(
        &self,
        hidden: &Tensor,
        plan: &StepPlan,
        cache: &mut LatentCache,
        ready: &[bool],
    ) -> Tensor {
        use crate::host_step::tensor_of;
        let size = hidden.size();
        let mut x: Vec<T> = if hidden.kind() == T::KIND && hidden.is_contiguous() {
            T::of(hidden).to_vec()
        } else {
            T::of(&hidden.to_kind(T::KIND).contiguous()).to_vec()
        };
        let mut pending: Option<Vec<T>> = None;
        let host = |t: Tensor| T::of(&t.contiguous()).to_vec();
        for ((layer, c), &ready) in self.layers.iter().zip(cache.layers.iter_mut()).zip(ready) {
            let (h, f) = if ready {
                layer.forward_host(x, pending.as_deref(), plan, c, self.config.hidden_size)
            } else {
                let f = pending.as_ref().map(|f| tensor_of(f, &size));
                let (h, f) = layer.forward_split(&tensor_of(&x, &size), f.as_ref(), plan, c);
                (host(h), host(f))
            };
            (x, pending) = (h, Some(f));
        }
        if let Some(f) = pending {
            // The residual add as libtorch's in T (f32 sum, rounded).
            for (v, a) in x.iter_mut().zip(&f) {
                *v = T::put(v.get() + a.get());
            }
        }
        tensor_of(&x, &size)
    }

    /// Final RMSNorm (last stage): the "final hidden state" that feeds lm_head and the MTP module.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        let norm = self.norm.as_ref().ok_or_else(|| input_err("this stage does not hold the final norm"))?;
        Ok(norm.forward(x))
    }

    /// Logits `[N, vocab]` in fp32 from final hidden states.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().ok_or_else(|| input_err("this stage does not hold lm_head"))?;
        let _guard = tch::no_grad_guard();
        // The next step starts with this stage's first layer: its weights stream in while the
        // step is sampled and the next one planned.
        if let Some(first) = self.layers.first() {
            crate::kernels::prefetch(&first.first_weights());
        }
        Ok(head.forward_float(h))
    }

    /// MTP hidden states for slots `(h_i, t_{i+1})`: `h_prev [n, H]` final hidden states and the
    /// following tokens `next_ids [n]`, laid out by `plan` over the MTP layer's cache.
    pub fn mtp_hidden(
        &self,
        h_prev: &Tensor,
        next_ids: &[u32],
        plan: &StepPlan,
        cache: &mut LatentCache,
    ) -> Result<Tensor> {
        let mtp = self.mtp.as_ref().ok_or_else(|| input_err("this stage holds no MTP module"))?;
        let c = cache.mtp.as_mut().ok_or_else(|| ModelError::Cache("the cache has no MTP layer".into()))?;
        let _guard = tch::no_grad_guard();
        Ok(mtp.forward(h_prev, &self.check_ids(next_ids)?, plan, c))
    }

    /// Convenience for a single full sequence with an empty cache: logits for every position of
    /// `ids` placed at positions `start_pos..`, and with `with_mtp` the MTP logits `[T-1, vocab]`.
    pub fn full_logits(
        &self,
        ids: &[u32],
        start_pos: usize,
        with_mtp: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if ids.is_empty() {
            return Err(input_err("no input ids"));
        }
        if !(self.is_first() && self.is_last()) {
            return Err(input_err("full_logits needs a model holding all layers"));
        }
        let block_size = 16;
        let blocks = ids.len().div_ceil(block_size);
        let mut cache = self.new_cache(blocks, block_size);
        let table: Vec<u32> = (0..blocks as u32).collect();
        let step = SeqStep { cached: 0, new: ids.len(), pos_offset: start_pos, block_table: table.clone() };
        let plan = self.plan(vec![step], &cache)?;
        let x = self.forward_layers(self.embed(ids)?, &plan, &mut cache)?;
        let h = self.final_norm(&x)?;
        let logits = self.logits(&h)?;
        let mtp = if with_mtp && ids.len() > 1 {
            let n = ids.len() - 1;
            let step = SeqStep { cached: 0, new: n, pos_offset: start_pos, block_table: table };
            let plan = self.plan(vec![step], &cache)?;
            let hm = self.mtp_hidden(&h.narrow(0, 0, n as i64), &ids[1..], &plan, &mut cache)?;
            Some(self.logits(&hm)?)
        } else {
            None
        };
        Ok((logits, mtp))
    }
}
