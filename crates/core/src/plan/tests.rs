//! Byte accounting on a tiny config worked out by hand, and the real DeepSeek-V3 shape against the
//! deployments it is known to fit (and not fit).

use std::collections::BTreeMap;

use super::*;
use crate::test_configs::V3;

/// 3 layers (1 dense, 2 MoE) + 1 MTP layer; every matrix is smaller than one 128 x 128 FP8 block,
/// so each FP8 weight carries exactly one f32 scale (4 bytes).
const TINY: &str = r#"{
  "model_type": "deepseek_v3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
  "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
  "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 32,
  "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
  "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
  "max_position_embeddings": 1000, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
  "bos_token_id": 0, "eos_token_id": 1,
  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                          "weight_block_size": [128, 128]}
}"#;

// Hand figures for TINY, FP8 native (1 byte per value + 4 per FP8 matrix):
// attention per layer: q_a 16x64=1024, q_b 24x16=384, kv_a 36x64=2304, kv_b 32x32=1024, o 64x16=1024
//   = 5760 values + 5 scales = 5780 bytes
const ATTN: u64 = 5780;
// norms per layer (bf16): input 64 + post 64 + q_a 16 + kv_a 32 = 176 values = 352 bytes
const NORMS: u64 = 352;
// dense MLP: 3 x 128x64 = 24576 values + 3 scales
const DENSE: u64 = 24588;
// router (fp32): gate 4x64 + bias 4 = 260 values = 1040 bytes
const ROUTER: u64 = 1040;
// one expert: 3 x 32x64 = 6144 values + 3 scales; the shared expert is the same size
const EXPERT: u64 = 6156;
// embedding and lm_head (bf16): 100x64 x 2 bytes
const EMBED: u64 = 12800;
// MTP extras: enorm, hnorm, shared_head.norm (3 x 64 bf16) + eh_proj 64x128 bf16
const MTP_EXTRAS: u64 = 384 + 16384;

fn tiny() -> ModelConfig {
    ModelConfig::from_json_str(TINY).unwrap()
}

fn one_stage(memory: Option<u64>, g: usize, weights: WeightFormat) -> MemoryPlan {
    let c = tiny();
    let d =
        Deployment { gpus_per_node: g, device_memory: memory, reserve: 1000, weights, ..Default::default() };
    plan(&c, &StoredFormats::convention(&c), &d).unwrap()
}

fn comps(p: &BTreeMap<Component, u64>) -> Vec<(&'static str, u64)> {
    p.iter().filter(|(_, &b)| b > 0).map(|(c, &b)| (c.name(), b)).collect()
}

#[test]
fn tiny_fp8_bytes_by_component() {
    let p = one_stage(None, 1, WeightFormat::Native);
    let moe_layer = ATTN + NORMS + ROUTER + 4 * EXPERT + EXPERT;
    assert_eq!(
        comps(&p.weight_bytes_by_component),
        vec![
            ("attention", 3 * ATTN),
            ("dense_mlp", DENSE),
            ("routed_experts", 2 * 4 * EXPERT),
            ("shared_experts", 2 * EXPERT),
            ("router", 2 * ROUTER),
            ("norms", 3 * NORMS + 128),
            ("embed_head", 2 * EMBED),
            // The single stage holds the main embedding: the MTP module shares it.
            ("mtp", moe_layer + MTP_EXTRAS),
        ]
    );
    let total = EMBED + (ATTN + NORMS + DENSE) + 2 * moe_layer + 128 + EMBED + moe_layer + MTP_EXTRAS;
    assert_eq!(p.weight_bytes, total);
    assert_eq!(total, 187_072);
    assert_eq!(p.fits, None);
    assert_eq!(p.kv_capacity_tokens, None);
    // 36 latent values x (3 layers + MTP) x bf16.
    assert_eq!(p.latent_cache_bytes_per_token, 36 * 4 * 2);
}

#[test]
fn tiny_experts_split_over_devices() {
    let p = one_stage(None, 2, WeightFormat::Native);
    let devs = &p.stages[0].devices;
    assert_eq!(devs.len(), 2);
    assert_eq!((devs[0].experts.clone(), devs[1].experts.clone()), (0..2, 2..4));
    // Device 1: two experts of each MoE layer (2 main + the MTP layer), nothing else.
    assert_eq!(
        comps(&devs[1].weight_bytes_by_component),
        vec![("routed_experts", 2 * 2 * EXPERT), ("mtp", 2 * EXPERT)]
    );
    assert_eq!(devs[0].weight_bytes + devs[1].weight_bytes, 187_072);
    assert!(devs[0].latent_cache && !devs[1].latent_cache);
}

#[test]
fn tiny_converted_formats() {
    // Values of everything but the routers, which stay fp32 (3 MoE layers' worth of 260 values).
    let values = 6400 + (5760 + 176 + 24576) + 2 * (5760 + 176 + 4 * 6144 + 6144) + 64 + 6400;
    let mtp_values = (5760 + 176 + 4 * 6144 + 6144) + 192 + 8192;
    let router = 3 * ROUTER;
    assert_eq!(one_stage(None, 1, WeightFormat::Bf16).weight_bytes, 2 * (values + mtp_values) + router);
    assert_eq!(one_stage(None, 1, WeightFormat::F32).weight_bytes, 4 * (values + mtp_values) + router);
}

#[test]
fn tiny_capacity_and_fit() {
    let per_token = 288u64;
    // Exactly MIN_KV_TOKENS tokens (256 blocks of 16) after reserve and weights, plus a little.
    let memory = 1000 + 187_072 + MIN_KV_TOKENS * per_token + 100;
    let p = one_stage(Some(memory), 1, WeightFormat::Native);
    assert_eq!(p.kv_blocks, Some(256));
    assert_eq!(p.kv_capacity_tokens, Some(4096));
    assert_eq!(p.max_context_tokens, Some(1000), "capped by max_position_embeddings");
    assert_eq!(p.fits, Some(true), "{:?}", p.problems);
    assert_eq!(p.stages[0].devices[0].free_bytes, Some((MIN_KV_TOKENS * per_token + 100) as i64));

    let p = one_stage(Some(memory - 200), 1, WeightFormat::Native);
    assert_eq!(p.kv_capacity_tokens, Some(4080));
    assert_eq!(p.fits, Some(false));
    assert!(p.problems[0].contains("fewer than 4096"), "{:?}", p.problems);

    let p = one_stage(Some(150_000), 1, WeightFormat::Native);
    assert_eq!(p.fits, Some(false));
    assert_eq!(p.kv_capacity_tokens, Some(0));
    assert!(p.problems[0].starts_with("stage 0 device 0:"), "{:?}", p.problems);
}

#[test]
fn tiny_two_stages_copy_the_embedding_for_mtp() {
    let c = tiny();
    let d = Deployment { nodes: 2, gpus_per_node: 1, reserve: 0, ..Default::default() };
    let p = plan(&c, &StoredFormats::convention(&c), &d).unwrap();
    assert_eq!(p.num_stages, 2);
    let (s0, s1) = (&p.stages[0], &p.stages[1]);
    assert!(s0.embeddings && !s0.lm_head && !s0.mtp && s1.lm_head && s1.mtp && !s1.embeddings);
    assert_eq!((s0.node, s1.node), (0, 1));
    assert_eq!(s0.layers.end, s1.layers.start);
    // The last stage loads the MTP layer's own copy of the embedding.
    assert_eq!(p.weight_bytes, 187_072 + EMBED);
    assert_eq!(s1.cache_layers, s1.layers.len() + 1);
    assert_eq!(p.latent_cache_bytes_per_token, 288);
}

#[test]
fn deployment_shapes_are_checked() {
    let c = tiny();
    let f = StoredFormats::convention(&c);
    let bad = |d: Deployment| plan(&c, &f, &d).unwrap_err().to_string();
    assert!(bad(Deployment { stages: Some(4), ..Default::default() }).contains("between 1 and"));
    assert!(bad(Deployment { nodes: 2, stages: Some(3), ..Default::default() }).contains("multiple of"));
    assert!(bad(Deployment { gpus_per_node: 3, stages: Some(2), ..Default::default() }).contains("evenly"));
    assert!(bad(Deployment { gpus_per_node: 8, ..Default::default() }).contains("routed experts"));
    // Two stages on one node of 2 devices: one device each.
    let p = plan(&c, &f, &Deployment { gpus_per_node: 2, stages: Some(2), ..Default::default() }).unwrap();
    assert_eq!((p.devices_per_stage, p.stages[1].node), (1, 0));
}

/// A checkpoint's safetensors header overrides the convention: here layer 0's q_a_proj is bf16.
#[test]
fn stored_formats_from_safetensors_headers() {
    let c = tiny();
    let dir = std::env::temp_dir().join(format!("mlaserve-plan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = serde_json::json!({
        "__metadata__": {"format": "pt"},
        "model.layers.0.self_attn.q_a_proj.weight": {"dtype": "BF16", "shape": [16, 64], "data_offsets": [0, 2048]},
        "model.layers.0.self_attn.q_b_proj.weight": {"dtype": "F8_E4M3", "shape": [24, 16], "data_offsets": [2048, 2432]},
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + 2432, 0);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let f = StoredFormats::from_dir(&dir, &c).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(f.source(), "safetensors header of 1 file");
    assert_eq!(f.contains("model.layers.0.self_attn.q_b_proj.weight"), Some(true));
    let p = plan(&c, &f, &Deployment::default()).unwrap();
    // q_a_proj: 1028 bytes as FP8 (1024 + one scale) becomes 2048 as bf16; the rest by convention.
    assert_eq!(p.weight_bytes_by_component[&Component::Attention], 3 * ATTN - 1028 + 2048);
    assert_eq!(p.weight_bytes, 187_072 - 1028 + 2048);
}

#[test]
fn unquantised_checkpoint_native_is_its_dtype() {
    let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
    v.as_object_mut().unwrap().remove("quantization_config");
    v["torch_dtype"] = "float32".into();
    let c = ModelConfig::from_json_str(&v.to_string()).unwrap();
    assert_eq!(c.quantization, crate::Quantization::None);
    let f = StoredFormats::convention(&c);
    let native = plan(&c, &f, &Deployment::default()).unwrap();
    let f32 = plan(&c, &f, &Deployment { weights: WeightFormat::F32, ..Default::default() }).unwrap();
    assert_eq!(native.weight_bytes, f32.weight_bytes);
    assert_eq!(native.params.by_stored_format.keys().collect::<Vec<_>>(), vec!["f32"]);
}

fn v3_plan(nodes: usize, memory: &str, weights: WeightFormat) -> MemoryPlan {
    let c = ModelConfig::from_json_str(V3).unwrap();
    let d = Deployment {
        nodes,
        gpus_per_node: 8,
        device_memory: Some(crate::byte_size::parse_bytes(memory).unwrap()),
        weights,
        ..Default::default()
    };
    plan(&c, &StoredFormats::convention(&c), &d).unwrap()
}

#[test]
fn deepseek_v3_parameter_counts() {
    let c = ModelConfig::from_json_str(V3).unwrap();
    let p = checkpoint_params(&c, &StoredFormats::convention(&c));
    // Published: 671B main-model parameters, 14B for the MTP module (its embedding and head copies
    // included), 684.5B stored in total.
    assert!((670.5e9..671.5e9).contains(&(p.main as f64)), "{}", p.main);
    assert!((13.0e9..14.5e9).contains(&(p.mtp as f64)), "{}", p.mtp);
    assert!((684.0e9..685.0e9).contains(&(p.total as f64)), "{}", p.total);
    // Everything but embeddings, heads, norms, routers and eh_proj is FP8.
    let fp8 = p.by_stored_format["fp8-e4m3-128x128"];
    assert!(fp8 as f64 / p.total as f64 > 0.99, "{:?}", p.by_stored_format);
}

#[test]
fn deepseek_v3_fp8_routed_expert_bytes_by_hand() {
    let p = v3_plan(1, "141GB", WeightFormat::Native);
    // gate/up [2048, 7168] and down [7168, 2048]: 14,680,064 values and 16 x 56 scales each.
    let expert = 3 * (2048 * 7168 + 4 * 16 * 56);
    assert_eq!(expert, 44_050_944);
    assert_eq!(p.weight_bytes_by_component[&Component::RoutedExperts], 58 * 256 * expert);
    // Each of the 8 devices holds 32 experts of each of the 58 MoE layers and the MTP layer.
    for d in &p.stages[0].devices {
        let routed = d.weight_bytes_by_component[&Component::RoutedExperts];
        assert_eq!(routed, 58 * 32 * expert);
    }
    // 576 latent values x 62 cached layers (61 + MTP) x bf16.
    assert_eq!(p.latent_cache_bytes_per_token, 576 * 62 * 2);
}

#[test]
fn deepseek_v3_fp8_fits_one_h200_node_and_two_h100_nodes() {
    for (nodes, memory) in [(1, "141GB"), (2, "80GB")] {
        let p = v3_plan(nodes, memory, WeightFormat::Native);
        assert_eq!(p.fits, Some(true), "{nodes}x8 {memory}: {:?}", p.problems);
        assert_eq!(p.max_context_tokens, Some(163_840), "{nodes}x8 {memory}");
        assert!(p.stages[nodes - 1].mtp && p.stages[nodes - 1].lm_head);
    }
    // One 8 x H200 node: about 86 GB of weights per GPU (what other servers report), device 0 more.
    let p = v3_plan(1, "141GB", WeightFormat::Native);
    let per_gpu = p.weight_bytes as f64 / 8.0 / 1e9;
    assert!((84.0..88.0).contains(&per_gpu), "{per_gpu}");
}

#[test]
fn deepseek_v3_bf16_needs_two_h200_nodes() {
    for (nodes, memory) in [(1, "141GB"), (2, "80GB")] {
        let p = v3_plan(nodes, memory, WeightFormat::Bf16);
        assert_eq!(p.fits, Some(false), "{nodes}x8 {memory}");
        assert!(!p.problems.is_empty());
    }
    let p = v3_plan(2, "141GB", WeightFormat::Bf16);
    assert_eq!(p.fits, Some(true), "{:?}", p.problems);
    // Even by the binary reading of the H100's 80 GB, bf16 does not fit two nodes.
    assert_eq!(v3_plan(2, "80GiB", WeightFormat::Bf16).fits, Some(false));
}

#[test]
fn json_shape() {
    let p = one_stage(Some(10_000_000), 2, WeightFormat::Native);
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(v["weights"], "native");
    assert_eq!(v["fits"], true);
    assert_eq!(v["stages"][0]["layers"], serde_json::json!({"start": 0, "end": 3}));
    assert_eq!(v["stages"][0]["devices"][1]["experts"], serde_json::json!({"start": 2, "end": 4}));
    assert_eq!(v["stages"][0]["devices"][0]["weight_bytes_by_component"]["attention"], 3 * ATTN);
    assert_eq!(v["weight_bytes"], 187_072);
    assert_eq!(v["cache_dtype"], "bf16");
}
