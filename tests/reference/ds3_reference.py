"""Ground truth from Hugging Face transformers (DeepseekV3ForCausalLM, eager attention).

Functions used by the tests, and a CLI:
  python ds3_reference.py logits   --model DIR --ids 0,5,7 [--start-pos N] [--dtype f32|bf16] [--mtp] --out F
  python ds3_reference.py generate --model DIR --ids 0,5,7 --max-new-tokens N [--dtype f32|bf16]
The `logits` output uses the same safetensors layout as `mlaserve logits`.
"""

import argparse
import json
import re

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

torch.set_num_threads(2)


def load(model_dir: str, dtype: str = "f32"):
    """The main model (and MtpModel when the checkpoint has one)."""
    with open(f"{model_dir}/config.json") as f:
        cfg = json.load(f)
    n = cfg["num_hidden_layers"]

    # transformers hard-codes the MTP layer of the 61-layer model in its ignore list; test models
    # have other layer counts.
    class Model(DeepseekV3ForCausalLM):
        _keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"]

    dt = torch.float32 if dtype == "f32" else torch.bfloat16
    model = Model.from_pretrained(model_dir, dtype=dt, attn_implementation="eager")
    model.eval()
    mtp = None
    if cfg.get("num_nextn_predict_layers", 0):
        mtp = MtpModel.from_pretrained(model)
        mtp.eval()
    return model, mtp


def mtp_hidden(mtp, h, pos, ids):
    """The MTP module's output for slots 0..T-2 from the post-norm final hidden states h (what
    transformers feeds it): slot i pairs (h_i, t_{i+1}) at the position of t_{i+1} and predicts t_{i+2}.
    Differentiable (tools/train_demo.py trains through it)."""
    return mtp.forward_layer(0, h[:, :-1], pos[:, 1:], None, input_ids=ids[:, 1:])


@torch.no_grad()
def logits(model, mtp, ids, start_pos=0, with_mtp=False, output_router_logits=False):
    x = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0) + start_pos
    out = model(input_ids=x, position_ids=pos, use_cache=False, output_hidden_states=True,
                output_router_logits=output_router_logits)
    result = {"logits": out.logits[0].float()}
    if with_mtp and mtp is not None and len(ids) > 1:
        hm = mtp_hidden(mtp, out.hidden_states[-1], pos, x)
        result["mtp_logits"] = mtp._project_to_logits(hm)[0].float()
    if output_router_logits:
        result["router_logits"] = out.router_logits
    return result


@torch.no_grad()
def greedy(model, ids, max_new_tokens):
    """Greedy decode through transformers' own cache; returns (new ids, min top1-top2 gap)."""
    x = torch.tensor([ids])
    out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         min_new_tokens=max_new_tokens)
    gaps = []
    for s in out.scores:
        top = torch.topk(s[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    return out.sequences[0, len(ids):].tolist(), min(gaps)


def expert_margins(config: dict, router_logits, bias_by_layer):
    """Per token, the smallest gap (over MoE layers) between the k-th and (k+1)-th expert choice score
    within the kept groups: where it is tiny, bf16 may legitimately route differently."""
    k, G, kg = config["num_experts_per_tok"], config["n_group"], config["topk_group"]
    margins = None
    for logits, bias in zip(router_logits, bias_by_layer):
        s = logits.float().sigmoid() + bias
        n, E = s.shape
        gs = s.view(n, G, E // G).topk(2, -1).values.sum(-1)
        keep = gs.topk(kg, -1).indices
        mask = torch.zeros(n, G, dtype=torch.bool).scatter_(1, keep, True)
        s = s.masked_fill(~mask.repeat_interleave(E // G, 1), float("-inf"))
        top = s.topk(min(k + 1, E), -1).values
        m = (top[:, k - 1] - top[:, k]) if top.shape[1] > k else torch.full((n,), float("inf"))
        margins = m if margins is None else torch.minimum(margins, m)
    return margins


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--ids", required=True)
    lg.add_argument("--start-pos", type=int, default=0)
    lg.add_argument("--dtype", default="f32")
    lg.add_argument("--mtp", action="store_true")
    lg.add_argument("--out", required=True)
    gn = sub.add_parser("generate")
    gn.add_argument("--model", required=True)
    gn.add_argument("--ids", required=True)
    gn.add_argument("--max-new-tokens", type=int, required=True)
    gn.add_argument("--dtype", default="f32")
    a = ap.parse_args()
    ids = [int(t) for t in re.split(r"[,\s]+", a.ids.strip()) if t]
    model, mtp = load(a.model, a.dtype)
    if a.cmd == "logits":
        r = logits(model, mtp, ids, a.start_pos, a.mtp)
        save_file({k: v.contiguous() for k, v in r.items()}, a.out)
    else:
        new, gap = greedy(model, ids, a.max_new_tokens)
        print(json.dumps({"ids": new, "min_gap": gap}))


if __name__ == "__main__":
    main()
