"""Random DeepSeek-V3-format checkpoints for tests and benchmarks.

Writes `config.json` (hub layout: `rope_theta` + `rope_scaling`) and safetensors with the Hugging Face
tensor names, per-expert weights, the MTP module as layer `num_hidden_layers` (with its embedding and
head copies, as the real checkpoint stores them), optionally FP8 e4m3 block-scaled weights.

Weights are fan-in scaled and the router's correction bias is large enough to change expert choices,
so that attention is far from uniform and routing is exercised. Everything is seeded.

Usage: python ds3_checkpoint.py --preset tiny --out DIR [--fp8] [--seed N] [--shards K]
"""

import argparse
import json
import math
import os

import torch

try:
    from safetensors.torch import save_file
except ImportError:  # e.g. a bare GPU image with only torch: the format is simple enough to write.
    def save_file(tensors, path, metadata=None):
        names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3",
                 torch.int64: "I64", torch.int32: "I32"}
        header, blobs, off = {"__metadata__": metadata or {}}, [], 0
        for k, t in tensors.items():
            raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
            blobs.append(raw)
            off += len(raw)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(path, "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for raw in blobs:
                f.write(raw)

PRESETS = {
    # Small enough for fp32 parity tests in seconds; shapes chosen so that nothing divides evenly
    # by accident (e.g. 4 heads, 8 rope dims, 16 experts in 4 groups).
    "tiny": dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    ),
    # q_lora_rank null: a plain q_proj as in DeepSeek-V2-Lite.
    "tiny-qnull": dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, num_nextn_predict_layers=0,
    ),
    # FP8 with the real 128x128 blocks and dimensions that leave partial edge blocks everywhere
    # (e.g. kv_a_proj_with_mqa has 160 + 16 = 176 rows: one full and one partial block).
    "fp8": dict(
        vocab_size=384, hidden_size=200, intermediate_size=300, moe_intermediate_size=72,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=3, q_lora_rank=136,
        kv_lora_rank=160, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=40,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    ),
    # Pipeline/worker tests: at least 4 layers, cheap.
    "small": dict(
        vocab_size=512, hidden_size=96, intermediate_size=160, moe_intermediate_size=48,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    ),
    # The ~200M-parameter benchmark shape: hidden 1024, 6 layers, 32 experts with 8 active,
    # MLA 512 + 64, vocab 32768; about 100M parameters (~200 MB bf16) active per token.
    "bench": dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=768,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=32, num_experts_per_tok=8, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    ),
}

FP8_QUANTISED = (
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
)


def make_config(preset: str, fp8: bool = False, mtp_agrees: bool = False, fp8_block=(128, 128)) -> dict:
    c = dict(PRESETS[preset])
    c.update(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        num_key_value_heads=c["num_attention_heads"], moe_layer_freq=1, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu", rms_norm_eps=1e-6,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, attention_bias=False,
        torch_dtype="bfloat16", initializer_range=0.02, use_cache=True,
    )
    if fp8:
        c["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                        weight_block_size=list(fp8_block))
    if mtp_agrees:
        c["mlaserve_test_note"] = "MTP module built to agree with the main head (speculation ceiling)"
    return c


def _lin(g, out_f, in_f, gain=1.0):
    return torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * (gain / math.sqrt(in_f))


def _norm(g, n):
    return 1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def _layer(g, c, i, moe):
    p = f"model.layers.{i}"
    H, h = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rkv, rq = c["kv_lora_rank"], c["q_lora_rank"]
    t = {
        f"{p}.input_layernorm.weight": _norm(g, H),
        f"{p}.post_attention_layernorm.weight": _norm(g, H),
        f"{p}.self_attn.kv_a_proj_with_mqa.weight": _lin(g, rkv + dr, H),
        f"{p}.self_attn.kv_a_layernorm.weight": _norm(g, rkv),
        f"{p}.self_attn.kv_b_proj.weight": _lin(g, h * (dn + dv), rkv),
        # Sharp attention: queries larger than fan-in scaling alone would give.
        f"{p}.self_attn.o_proj.weight": _lin(g, H, h * dv),
    }
    if rq is None:
        t[f"{p}.self_attn.q_proj.weight"] = _lin(g, h * (dn + dr), H, gain=1.0)
    else:
        t[f"{p}.self_attn.q_a_proj.weight"] = _lin(g, rq, H)
        t[f"{p}.self_attn.q_a_layernorm.weight"] = _norm(g, rq)
        t[f"{p}.self_attn.q_b_proj.weight"] = _lin(g, h * (dn + dr), rq, gain=1.0)
    if moe:
        E, I = c["n_routed_experts"], c["moe_intermediate_size"]
        t[f"{p}.mlp.gate.weight"] = _lin(g, E, H, gain=1.0)
        # Large enough against sigmoid scores in (0, 1) to change many choices.
        t[f"{p}.mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(E, generator=g, dtype=torch.float64)
        for e in range(E):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = _lin(g, I, H)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = _lin(g, I, H)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = _lin(g, H, I)
        S = I * c["n_shared_experts"]
        if S:
            t[f"{p}.mlp.shared_experts.gate_proj.weight"] = _lin(g, S, H)
            t[f"{p}.mlp.shared_experts.up_proj.weight"] = _lin(g, S, H)
            t[f"{p}.mlp.shared_experts.down_proj.weight"] = _lin(g, H, S)
    else:
        I = c["intermediate_size"]
        t[f"{p}.mlp.gate_proj.weight"] = _lin(g, I, H)
        t[f"{p}.mlp.up_proj.weight"] = _lin(g, I, H)
        t[f"{p}.mlp.down_proj.weight"] = _lin(g, H, I)
    return t


def make_weights(c: dict, seed: int = 0, mtp_agrees: bool = False) -> dict:
    """float64 master weights with checkpoint names."""
    g = torch.Generator().manual_seed(seed)
    V, H, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g, dtype=torch.float64)}
    for i in range(L):
        t.update(_layer(g, c, i, moe=i >= c["first_k_dense_replace"]))
    t["model.norm.weight"] = _norm(g, H)
    t["lm_head.weight"] = _lin(g, V, H, gain=2.0)
    if c.get("num_nextn_predict_layers", 0):
        p = f"model.layers.{L}"
        t.update(_layer(g, c, L, moe=True))
        t[f"{p}.enorm.weight"] = _norm(g, H)
        t[f"{p}.hnorm.weight"] = _norm(g, H)
        t[f"{p}.eh_proj.weight"] = _lin(g, H, 2 * H)
        t[f"{p}.shared_head.norm.weight"] = _norm(g, H)
        t[f"{p}.shared_head.head.weight"] = t["lm_head.weight"].clone()
        t[f"{p}.embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
    if mtp_agrees:
        # A bigram model whose MTP head agrees with it by construction (speculation ceiling): every
        # attention and MLP output is zero, so the main model predicts from the current token alone,
        # logits(t) = lm_head(norm(embed[t])); the MTP layer keeps only the embedding half of eh_proj,
        # so its draft from (h_i, t_{i+1}) is lm_head(norm(embed[t_{i+1}])), the main model's next pick.
        for k in list(t):
            if k.endswith("o_proj.weight") or k.endswith("down_proj.weight"):
                t[k] = torch.zeros_like(t[k])
        p = f"model.layers.{L}"
        t[f"{p}.eh_proj.weight"] = torch.cat([torch.eye(H, dtype=torch.float64),
                                               torch.zeros(H, H, dtype=torch.float64)], dim=1)
        t[f"{p}.enorm.weight"] = torch.ones(H, dtype=torch.float64)
        t[f"{p}.shared_head.norm.weight"] = t["model.norm.weight"].clone()
    return t


def quantise_fp8(w: torch.Tensor, block=(128, 128)):
    """Block-scaled e4m3: returns (fp8 weight, fp32 scale_inv, exact float64 dequantisation)."""
    bo, bi = block
    rows, cols = w.shape
    so, si = math.ceil(rows / bo), math.ceil(cols / bi)
    scale = torch.empty(so, si, dtype=torch.float32)
    for a in range(so):
        for b in range(si):
            blk = w[a * bo:(a + 1) * bo, b * bi:(b + 1) * bi]
            scale[a, b] = max(blk.abs().max().item(), 1e-12) / 448.0
    full = scale.double().repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
    q = (w / full).to(torch.float8_e4m3fn)
    deq = q.double() * full
    return q, scale, deq


def is_fp8_target(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    return leaf in FP8_QUANTISED


def save_checkpoint(out: str, c: dict, weights: dict, dtype=torch.bfloat16, fp8: bool = False, shards: int = 1):
    """Writes the checkpoint; returns the float64 weights the written files represent exactly."""
    os.makedirs(out, exist_ok=True)
    tensors, exact = {}, {}
    for name, w in weights.items():
        if fp8 and is_fp8_target(name):
            q, s, deq = quantise_fp8(w, tuple(c["quantization_config"]["weight_block_size"]))
            tensors[name] = q
            tensors[name + "_scale_inv"] = s
            exact[name] = deq
        elif name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight"):
            tensors[name] = w.to(torch.float32)
            exact[name] = tensors[name].double()
        else:
            tensors[name] = w.to(dtype)
            exact[name] = tensors[name].double()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    names = sorted(tensors)
    if shards <= 1:
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = math.ceil(len(names) / shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, os.path.join(out, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    cfg = dict(c)
    cfg["torch_dtype"] = "float32" if dtype == torch.float32 else "bfloat16"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return exact


CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "mlaserve", "assets", "demo-corpus.txt")
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# A minimal template for tests that only need chat input to work; the DeepSeek-V3 template itself is
# tested separately.
SIMPLE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                   "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
                   "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def write_tokenizer(out: str, vocab_size: int):
    """A byte-level BPE trained on the demo corpus, padded with extra tokens to exactly `vocab_size`
    entries, BOS = 0, EOS = 1, plus a tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - 8, 300), min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(CORPUS, encoding="utf-8") as f:
        tok.train_from_iterator([l for l in f if l.strip()], trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} tokens, the model only {vocab_size}")
    tok.add_special_tokens([f"<extra_{i}>" for i in range(vocab_size - n)])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL[0]} $A", pair=f"{SPECIAL[0]} $A $B",
                                                       special_tokens=[(SPECIAL[0], 0)])
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "add_bos_token": True,
                   "model_max_length": 163840, "chat_template": SIMPLE_TEMPLATE}, f, ensure_ascii=False, indent=1)


def build(out: str, preset: str, seed: int = 0, dtype: str = "f32", fp8: bool = False, shards: int = 1,
          mtp_agrees: bool = False, tokenizer: bool = True, fp8_block=(128, 128)):
    c = make_config(preset, fp8=fp8, mtp_agrees=mtp_agrees, fp8_block=fp8_block)
    w = make_weights(c, seed=seed, mtp_agrees=mtp_agrees)
    dt = torch.float32 if dtype == "f32" else torch.bfloat16
    exact = save_checkpoint(out, c, w, dtype=dt, fp8=fp8, shards=shards)
    if tokenizer and c["vocab_size"] >= 300:
        write_tokenizer(out, c["vocab_size"])
    return c, exact


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--mtp-agrees", action="store_true")
    a = ap.parse_args()
    build(a.out, a.preset, seed=a.seed, dtype=a.dtype, fp8=a.fp8, shards=a.shards, mtp_agrees=a.mtp_agrees)
    print(a.out)


if __name__ == "__main__":
    main()
