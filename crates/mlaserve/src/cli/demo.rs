//! The demo checkpoint `mlaserve serve` uses when no model is given: a small DeepSeek-V3-shaped
//! model with RANDOM weights (its output is gibberish), a byte-level BPE tokenizer trained here on
//! the text in `assets/demo-corpus.txt`, and the DeepSeek-V3 chat template. Built once and cached.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

const CORPUS: &str = include_str!("../../assets/demo-corpus.txt");
/// Bump when the demo's shape, tokenizer or template changes, so caches rebuild.
const DEMO_VERSION: u32 = 1;

/// DeepSeek-V3's special tokens; the first two are BOS (id 0) and EOS (id 1) as in the real model.
const SPECIAL_TOKENS: [&str; 16] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
];

pub fn cache_dir() -> PathBuf {
    std::env::var_os("MLASERVE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mlaserve")))
        .unwrap_or_else(|| std::env::temp_dir().join("mlaserve"))
}

/// The cached demo model directory, built on first use.
pub fn ensure_demo_model() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(format!("demo-model-v{DEMO_VERSION}"));
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    eprintln!("mlaserve: building the demo model (random weights) in {}", dir.display());
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    build_demo(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // Another process won the race: use its copy.
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).with_context(|| format!("moving the demo model to {}", dir.display())),
    }
    Ok(dir)
}

fn train_tokenizer(vocab: usize) -> anyhow::Result<Tokenizer> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS.iter().map(|s| AddedToken::from(*s, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train(&mut trainer, CORPUS.lines().filter(|l| !l.trim().is_empty()))
        .map_err(|e| anyhow::anyhow!("training the demo tokenizer: {e}"))?;
    let bos = SPECIAL_TOKENS[0];
    let bos_id = tok.token_to_id(bos).context("BOS missing")?;
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .try_pair(format!("{bos} $A {bos} $B"))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .special_tokens(vec![(bos.to_string(), bos_id)])
            .build()?,
    ));
    Ok(tok)
}

fn build_demo(dir: &Path) -> anyhow::Result<()> {
    let tok = train_tokenizer(2048)?;
    let vocab = tok.get_vocab_size(true);
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer: {e}"))?;
    let tcfg = json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "add_bos_token": true,
        "add_eos_token": false,
        "model_max_length": 16384,
        "chat_template": mlaserve_router::chat_template::DEEPSEEK_V3_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tcfg)?)?;

    let c = json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab,
        "hidden_size": 256,
        "intermediate_size": 640,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": true,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 16384,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "attention_bias": false,
        "torch_dtype": "bfloat16",
        "mlaserve_note": "demo model with random weights: its output is meaningless",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&c)?)?;
    let tensors = random_weights(&c);
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Fan-in scaled random weights under the checkpoint's tensor names (bf16; router in fp32).
fn random_weights(c: &serde_json::Value) -> Vec<(String, Tensor)> {
    tch::manual_seed(20261128);
    let g = |k: &str| c[k].as_u64().expect("int config field") as i64;
    let (v, h, l) = (g("vocab_size"), g("hidden_size"), g("num_hidden_layers"));
    let (nh, rq, rkv) = (g("num_attention_heads"), g("q_lora_rank"), g("kv_lora_rank"));
    let (dn, dr, dv) = (g("qk_nope_head_dim"), g("qk_rope_head_dim"), g("v_head_dim"));
    let (e, mi, di) = (g("n_routed_experts"), g("moe_intermediate_size"), g("intermediate_size"));
    let opts = (Kind::Float, Device::Cpu);
    let lin = |o: i64, i: i64| (Tensor::randn([o, i], opts) / (i as f64).sqrt()).to_kind(Kind::BFloat16);
    let norm = |n: i64| (Tensor::randn([n], opts) * 0.05 + 1.0).to_kind(Kind::BFloat16);
    let mut t: Vec<(String, Tensor)> = vec![
        ("model.embed_tokens.weight".into(), Tensor::randn([v, h], opts).to_kind(Kind::BFloat16)),
        ("model.norm.weight".into(), norm(h)),
        ("lm_head.weight".into(), lin(v, h)),
    ];
    for i in 0..=l {
        let p = format!("model.layers.{i}");
        let mut add = |n: &str, x: Tensor| t.push((format!("{p}.{n}"), x));
        add("input_layernorm.weight", norm(h));
        add("post_attention_layernorm.weight", norm(h));
        add("self_attn.q_a_proj.weight", lin(rq, h));
        add("self_attn.q_a_layernorm.weight", norm(rq));
        add("self_attn.q_b_proj.weight", lin(nh * (dn + dr), rq));
        add("self_attn.kv_a_proj_with_mqa.weight", lin(rkv + dr, h));
        add("self_attn.kv_a_layernorm.weight", norm(rkv));
        add("self_attn.kv_b_proj.weight", lin(nh * (dn + dv), rkv));
        add("self_attn.o_proj.weight", lin(h, nh * dv));
        if i < g("first_k_dense_replace") {
            add("mlp.gate_proj.weight", lin(di, h));
            add("mlp.up_proj.weight", lin(di, h));
            add("mlp.down_proj.weight", lin(h, di));
        } else {
            add("mlp.gate.weight", Tensor::randn([e, h], opts) / (h as f64).sqrt());
            add("mlp.gate.e_score_correction_bias", Tensor::randn([e], opts) * 0.05);
            for x in 0..e {
                add(&format!("mlp.experts.{x}.gate_proj.weight"), lin(mi, h));
                add(&format!("mlp.experts.{x}.up_proj.weight"), lin(mi, h));
                add(&format!("mlp.experts.{x}.down_proj.weight"), lin(h, mi));
            }
            add("mlp.shared_experts.gate_proj.weight", lin(mi, h));
            add("mlp.shared_experts.up_proj.weight", lin(mi, h));
            add("mlp.shared_experts.down_proj.weight", lin(h, mi));
        }
        if i == l {
            add("enorm.weight", norm(h));
            add("hnorm.weight", norm(h));
            add("eh_proj.weight", lin(h, 2 * h));
            add("shared_head.norm.weight", norm(h));
        }
    }
    t
}
