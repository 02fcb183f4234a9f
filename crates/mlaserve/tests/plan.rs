//! `mlaserve plan` and `mlaserve plan-stages` as a user runs them, on a generated DeepSeek-V3
//! config.json (no weights).

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// The published DeepSeek-V3 config.json (the fields the plan reads, with their hub values).
const V3: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
  "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
  "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
  "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
  "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
  "hidden_act": "silu", "rms_norm_eps": 1e-06, "max_position_embeddings": 163840, "rope_theta": 10000,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "num_nextn_predict_layers": 1, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
  "torch_dtype": "bfloat16",
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [128, 128]}
}"#;

fn model_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlaserve-plan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), V3).unwrap();
    dir
}

fn mlaserve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlaserve")).args(args).output().expect("running mlaserve")
}

fn plan_json(dir: &str, extra: &[&str]) -> Value {
    let mut args = vec!["plan", "--model", dir, "--gpus-per-node", "8", "--json"];
    args.extend_from_slice(extra);
    let out = mlaserve(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn plan_says_what_fits_deepseek_v3() {
    let dir = model_dir();
    let d = dir.to_str().unwrap();

    let p = plan_json(d, &["--gpu-memory", "141GB"]);
    assert_eq!(p["fits"], true, "{}", p["problems"]);
    assert_eq!(p["weights"], "native");
    assert_eq!(p["max_context_tokens"], 163_840);
    assert_eq!(p["latent_cache_bytes_per_token"], 576 * 62 * 2);
    let stages = p["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1);
    let devices = stages[0]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 8);
    for dev in devices {
        let w = dev["weight_bytes"].as_u64().unwrap();
        assert!((70e9..120e9).contains(&(w as f64)), "{dev}");
        assert!(dev["weight_bytes_by_component"]["routed_experts"].as_u64().unwrap() > 80_000_000_000);
    }
    assert!(devices[0]["weight_bytes_by_component"]["attention"].as_u64().unwrap() > 10_000_000_000);
    assert_eq!(devices[1]["weight_bytes_by_component"]["attention"], 0);

    let p = plan_json(d, &["--nodes", "2", "--gpu-memory", "80GB"]);
    assert_eq!(p["fits"], true, "{}", p["problems"]);
    assert_eq!(p["stages"][1]["mtp"], true);
    assert_eq!(p["stages"][0]["layers"]["end"], p["stages"][1]["layers"]["start"]);

    for (nodes, memory, fits) in [("1", "141GB", false), ("2", "80GB", false), ("2", "141GB", true)] {
        let p = plan_json(d, &["--nodes", nodes, "--gpu-memory", memory, "--weights", "bf16"]);
        assert_eq!(p["fits"], fits, "bf16 {nodes}x8 {memory}: {}", p["problems"]);
        assert_eq!(p["weights"], "bf16");
    }

    // The table form says the same.
    let out = mlaserve(&["plan", "--model", d, "--gpus-per-node", "8", "--gpu-memory", "140GiB"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && text.contains("fits: yes"), "{text}");
    assert!(text.contains("routed_experts") && text.contains("stage 0 (node 0): layers 0..61"), "{text}");

    // A size that is not one is refused, naming the accepted forms.
    let out = mlaserve(&["plan", "--model", d, "--gpu-memory", "141 parsecs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("141GB, 140GiB"));

    // plan-stages keeps printing the split, one range per line.
    let out = mlaserve(&["plan-stages", "--model", d, "--stages", "2"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("0..") && lines[1].ends_with("..61"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
