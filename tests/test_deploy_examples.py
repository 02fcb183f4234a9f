"""The example topologies under deploy/ (one values file per topology, all in leaderworkerset mode),
checked by `mlaserve plan` against the published DeepSeek-V3 config.json: each fits its nodes, and its
latent cache fits what the plan leaves free. (tests/test_helm_lws.py lints, renders and validates them.)
"""

import json
import subprocess

import pytest

from conftest import BIN
from test_helm import DEFAULTS, DEPLOY, merged
from test_helm_lws import EXAMPLES



# The published DeepSeek-V3 config.json (model card); `plan` reads nothing else.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu", "rms_norm_eps": 1e-06,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "attention_bias": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}
# GPU memory as nvidia-smi reports it, by the product label the examples select nodes with.
GPU_MEMORY = {"NVIDIA-H200": "143771MiB", "NVIDIA-H100-80GB-HBM3": "81559MiB"}
WEIGHTS = {"deploy/values-deepseek-v3-fp8-1x8xh200": "native", "deploy/values-deepseek-v3-fp8-2x8xh100": "native",
           "deploy/values-deepseek-v3-bf16-2x8xh200": "bf16"}


def test_every_example_has_a_plan_entry():
    assert set(WEIGHTS) == set(EXAMPLES) and len(EXAMPLES) == 3
    for name, ex in EXAMPLES.items():
        assert ex["deployment"]["mode"] == "leaderworkerset"
        assert ex["worker"]["expertShards"] == ex["worker"]["gpusPerNode"], f"{name}: a stage takes its whole node"
        assert f"-f {name}.yaml" in (DEPLOY / f"{name.split('/')[1]}.yaml").read_text(), "the helm install line"


@pytest.fixture(scope="session")
def plan_command():
    assert BIN.exists(), f"{BIN} is missing: run `make build`"
    p = subprocess.run([BIN, "plan", "--help"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        pytest.skip(f"{BIN} has no `plan` subcommand yet (the FP8 issue adds it): {p.stderr.strip()[:200]}")
    return BIN


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_example_topology_fits_by_plan(plan_command, case, tmp_path):
    v = merged(DEFAULTS, EXAMPLES[case])
    w = v["worker"]
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    args = [plan_command, "plan", "--model", tmp_path, "--nodes", w["stages"], "--gpus-per-node", w["gpusPerNode"],
            "--gpu-memory", GPU_MEMORY[w["nodeSelector"]["nvidia.com/gpu.product"]], "--weights", WEIGHTS[case], "--json"]
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["fits"] is True, plan.get("problems")
    assert plan["num_stages"] == w["stages"] and plan["devices_per_stage"] == w["expertShards"]
    # The example's latent cache fits what the plan leaves free on every stage.
    assert plan["kv_blocks"] * plan["block_size"] >= w["config"]["kv_blocks"] * w["config"]["block_size"], plan["kv_blocks"]


def test_bf16_does_not_fit_one_h200_node(plan_command, tmp_path):
    """The other side of the FP8 example: the plan is not vacuous."""
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    p = subprocess.run(list(map(str, [plan_command, "plan", "--model", tmp_path, "--nodes", 1, "--gpus-per-node", 8,
                                      "--gpu-memory", GPU_MEMORY["NVIDIA-H200"], "--weights", "bf16", "--json"])),
                       capture_output=True, text=True, timeout=120)
    assert json.loads(p.stdout)["fits"] is False, p.stdout + p.stderr
