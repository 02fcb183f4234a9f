"""Trains the demo model `mlaserve serve` uses without --model: a tiny DeepSeek-V3-shaped model on
Python's own documentation. Fluent-ish, not knowledgeable.

Main model: transformers' DeepseekV3ForCausalLM (MLA with latent ranks, a dense first layer, MoE with
group-limited sigmoid routing). MTP: one module (transformers' MtpModel, driven by the same slot
convention as tests/reference/ds3_reference.py), trained with loss = CE_main + lambda * CE_mtp. The
routers' correction biases are balanced the auxiliary-loss-free way: after each step
bias += gamma * sign(mean_load - load), per layer (deepseek-v3.md §9.1).

Data (every machine has it): `pydoc_data.topics`, the docstrings of every importable standard-library
module, crates/mlaserve/assets/demo-corpus.txt, and the project's own prose that is not held out (the
shared DeepSeek-V3 and serving-landscape notes, docs/PERFORMANCE.md, the crates' doc comments; snapshot:
tools/demo_project_corpus.txt, without any paragraph that shares eight consecutive words with the
held-out text); some documents are also rendered as chats with the DeepSeek-V3 template so that the
model learns the chat format and EOS. Held out: every 20th document (in-domain split) and, as text from
outside the training set, prose of the project's README.md, docs/ARCHITECTURE.md and docs/deploy.md
(snapshot: tools/demo_heldout.txt), copied out as heldout.txt. The text depends on the Python version
(docstrings); training.json records it and the text's sha256.

  nice -n 10 python tools/train_demo.py --out crates/mlaserve/assets/demo-model
"""

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import ds3_checkpoint  # noqa: E402
import ds3_reference  # noqa: E402

# DeepSeek-V3's special tokens, as crates/mlaserve/src/cli/demo.rs names them: BOS = 0, EOS = 1.
SPECIAL = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
    "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
BOS, EOS = 0, 1

# Standard-library modules not read for docstrings: side effects on import, GUI, tests, private.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv",
        "pydoc_data", "__main__", "__future__"}


def stdlib_modules():
    """Every importable public standard-library module and package submodule, in sorted order."""
    import pkgutil
    import warnings

    warnings.simplefilter("ignore")
    names = []
    for n in sorted(sys.stdlib_module_names - SKIP):
        if n.startswith("_"):
            continue
        try:
            mod = importlib.import_module(n)
        except Exception:  # platform-specific (e.g. winreg): absent here
            continue
        names.append(n)
        for i in pkgutil.iter_modules(getattr(mod, "__path__", [])):
            sub = f"{n}.{i.name}"
            if i.name.startswith("_") or "test" in i.name:
                continue
            try:
                importlib.import_module(sub)
                names.append(sub)
            except Exception:
                continue
    return names


SHAPE = dict(
    hidden_size=256, intermediate_size=768, moe_intermediate_size=64, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
)


def docstrings():
    docs, seen = [], set()
    for name in stdlib_modules():
        mod = sys.modules[name]
        objs = [(name, mod)]
        for k, v in sorted(vars(mod).items()):
            if k.startswith("_") or getattr(v, "__module__", name) != name:
                continue
            if inspect.isclass(v) or inspect.isroutine(v):
                objs.append((f"{name}.{k}", v))
                if inspect.isclass(v):
                    objs += [(f"{name}.{k}.{m}", f) for m, f in sorted(vars(v).items())
                             if not m.startswith("_") and inspect.isroutine(f)]
        for qual, o in objs:
            d = inspect.getdoc(o)
            if d and len(d) > 80 and d not in seen:
                seen.add(d)
                docs.append((qual, d))
    return docs


def chat_template():
    """The router's embedded DeepSeek-V3 template (DEEPSEEK_V3_TEMPLATE)."""
    return (ROOT / "crates" / "router" / "src" / "chat_template" / "deepseek_v3.jinja").read_text()


def render_chat(template, user, assistant):
    import jinja2

    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return env.from_string(template).render(messages=msgs, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                            add_generation_prompt=False)


def documents(template, project):
    """(train, held-out) lists of (kind, text); text of chat documents is fully rendered."""
    import pydoc_data.topics as pt

    raw = [("topic", k, v.strip()) for k, v in sorted(pt.topics.items())]
    raw += [("doc", q, d) for q, d in docstrings()]
    corpus = (ROOT / "crates" / "mlaserve" / "assets" / "demo-corpus.txt").read_text()
    raw += [("corpus", "", l.strip()) for l in corpus.splitlines() if l.strip()]
    raw += [("project", "", p) for p in project.split("\n\n") if p.strip()]
    train, held = [], []
    for i, (kind, name, text) in enumerate(raw):
        if kind != "corpus" and i % 20 == 7:
            held.append(("plain", text))
            continue
        train.append(("plain", text))
        # Every third docstring and every topic also as a chat (its first paragraph as the answer).
        if kind == "topic" or (kind == "doc" and i % 3 == 0):
            first = text.split("\n\n")[0] if kind == "doc" else "\n\n".join(text.split("\n\n")[:3])
            q = (f"What does {name} do?" if kind == "doc" else
                 f"Tell me about {text.splitlines()[0].strip()}.")
            train.append(("chat", render_chat(template, q, first)))
    return train, held


HELDOUT_SOURCES = ("README.md", "docs/ARCHITECTURE.md", "docs/deploy.md")
# The project's own prose that may be trained on: the shared model and landscape notes, the
# performance notes, and the Rust doc comments. Never the held-out files above.
PROJECT_SOURCES = ("../shared/docs/deepseek-v3.md", "../shared/docs/serving-landscape.md", "docs/PERFORMANCE.md")


def prose_paragraphs(text):
    """Prose paragraphs and list items of a Markdown text (no code blocks, tables or headings)."""
    paras = []
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\n(?=\s*(?:[-*]|\d+\.) )", "\n\n", text)  # list items become paragraphs
    for p in re.split(r"\n\s*\n", text):
        p = re.sub(r"^\s*(?:[-*]|\d+\.) ", "", p.strip())
        if len(p) < 80 or p[0] in "#|<" or "\n|" in p or p.startswith("    "):
            continue
        paras.append(" ".join(p.split()))
    return paras


def heldout_prose():
    """Prose of the held-out project docs."""
    return "\n\n".join(p for f in HELDOUT_SOURCES for p in prose_paragraphs((ROOT / f).read_text())) + "\n"


def doc_comments():
    """The Rust doc comments (`//!`, `///`) of the crates, one paragraph per blank comment line."""
    out = []
    for f in sorted((ROOT / "crates").rglob("*.rs")):
        block = []
        for line in f.read_text().splitlines() + [""]:
            m = re.match(r"\s*//[/!] ?(.*)$", line)
            if m and m.group(1).strip():
                block.append(m.group(1).strip())
                continue
            if block:
                p = " ".join(block)
                if len(p) >= 80 and not p.startswith(("```", "#")):
                    out.append(p)
            block = []
    return out


def shingles(text, n=8):
    w = re.findall(r"\w+", text.lower())
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def project_prose(held):
    """The trainable project prose, without any paragraph that shares eight consecutive words with the
    held-out text (the docs repeat themselves; such a paragraph would leak it)."""
    paras = [p for f in PROJECT_SOURCES for p in prose_paragraphs((ROOT / f).read_text())] + doc_comments()
    seen = shingles(held)
    return "\n\n".join(p for p in paras if not shingles(p) & seen) + "\n"


def train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL[0]} $A", pair=f"{SPECIAL[0]} $A $B",
                                                       special_tokens=[(SPECIAL[0], BOS)])
    return tok


def encode(tok, kind, text):
    """Token ids of one training document: plain text gets BOS ... EOS; chats carry their own markers."""
    if kind == "chat":
        return tok.encode(text, add_special_tokens=False).ids
    return [BOS] + tok.encode(text, add_special_tokens=False).ids + [EOS]


def windows(ids, n):
    """Non-overlapping evaluation windows of n tokens, each starting with BOS (n - 1 predictions each)."""
    return [[BOS] + ids[i:i + n - 1] for i in range(0, len(ids) - 1, n - 1) if len(ids[i:i + n - 1]) > 1]


def make_config(vocab):
    c = ds3_checkpoint.make_config("tiny")
    c.update(SHAPE, vocab_size=vocab, max_position_embeddings=16384,
             rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=4096, beta_fast=32,
                               beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
             mlaserve_note="trained demo model (tools/train_demo.py): fluent-ish, not knowledgeable")
    return c


def build_models(c):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    cfg = DeepseekV3Config(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(cfg)
    mtp = MtpModel(model, c["num_nextn_predict_layers"])
    # MtpModel's generic init leaves the DeepSeek-specific tensors (experts, router) to the model class.
    with torch.no_grad():
        for m in mtp.layers.modules():
            model._init_weights(m)
    return model, mtp


def losses(model, mtp, x):
    """(main CE, MTP CE) on a batch of token windows: the MTP slot i pairs (h_i, t_{i+1}) and predicts t_{i+2}."""
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
    out = model(input_ids=x, position_ids=pos, use_cache=False, output_hidden_states=True)
    V = out.logits.shape[-1]
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    hm = ds3_reference.mtp_hidden(mtp, out.hidden_states[-1], pos, x)
    ml = mtp._project_to_logits(hm[:, :-1])
    return main, F.cross_entropy(ml.reshape(-1, V), x[:, 2:].reshape(-1))


def residual_dropout(model, mtp, p):
    """Dropout on what each attention and MLP block adds to the residual stream (training only): the
    text is small, and without it the model memorises it and does worse on text it has not seen."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    def drop(m, _inp, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, m.training), *out[1:])
        return F.dropout(out, p, m.training)

    for mod in (model, mtp):
        for layer in mod.modules():
            if isinstance(layer, DeepseekV3DecoderLayer):
                layer.self_attn.register_forward_hook(drop)
                layer.mlp.register_forward_hook(drop)


def routers(model, mtp):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    return [m for mod in (model, mtp) for m in mod.modules() if isinstance(m, DeepseekV3TopkRouter)]


def track_loads(rs):
    """Counts of tokens routed to each expert per router since the last reset (forward hooks)."""
    loads = [torch.zeros(r.num_experts) for r in rs]

    def hook(i):
        def f(_m, _inp, out):
            loads[i] += torch.bincount(out[2].flatten(), minlength=len(loads[i])).float()
        return f

    for i, r in enumerate(rs):
        r.register_forward_hook(hook(i))
    return loads


def export(model, mtp, c, out):
    """Checkpoint tensor names (per-expert weights, MTP as layer L) from the trained modules."""
    L, I = c["num_hidden_layers"], c["moe_intermediate_size"]
    w = {}
    for prefix, mod in (("", model), ("mtp.", mtp)):
        for k, v in mod.state_dict().items():
            if prefix and (k.startswith("embed_tokens") or k.startswith("shared_head")):
                continue  # shared with the main model; mlaserve and transformers use the main copies
            if prefix:
                k = re.sub(r"^layers\.0\.mtp_block\.", f"model.layers.{L}.", k)
                k = re.sub(r"^layers\.0\.post_norm\.", f"model.layers.{L}.shared_head.norm.", k)
                k = re.sub(r"^layers\.0\.", f"model.layers.{L}.", k)
            m = re.match(r"(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$", k)
            if m:
                for e in range(v.shape[0]):
                    base = f"{m.group(1)}.experts.{e}"
                    if m.group(2) == "gate_up_proj":
                        w[f"{base}.gate_proj.weight"], w[f"{base}.up_proj.weight"] = v[e, :I], v[e, I:]
                    else:
                        w[f"{base}.down_proj.weight"] = v[e]
            else:
                w[k] = v
    ds3_checkpoint.save_checkpoint(out, c, {k: v.detach().clone() for k, v in w.items()}, dtype=torch.bfloat16)


def heldout_ce(model_dir, wins):
    """Mean CE (nats/token) of the shipped files through transformers, f32 compute."""
    model, mtp = ds3_reference.load(model_dir, "f32")
    nll, n = 0.0, 0
    for w in wins:
        lg = ds3_reference.logits(model, mtp, w)["logits"]
        nll += F.cross_entropy(lg[:-1], torch.tensor(w[1:]), reduction="sum").item()
        n += len(w) - 1
    return nll / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mtp-lambda", type=float, default=0.3)
    ap.add_argument("--gamma", type=float, default=0.004, help="correction-bias update speed")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", default=str(ROOT / "tools" / "demo_heldout.txt"),
                    help="text from outside the training set (created from the project's docs if missing)")
    ap.add_argument("--project", default=str(ROOT / "tools" / "demo_project_corpus.txt"),
                    help="the project's prose trained on (created from the project's docs if missing)")
    ap.add_argument("--eval-every", type=int, default=200)
    a = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    template = chat_template()
    # Snapshots, so that later edits of the docs change neither the training text nor the held-out loss.
    held_file, project_file = Path(a.heldout), Path(a.project)
    if not held_file.exists():
        held_file.write_text(heldout_prose())
    prose = held_file.read_text()
    if not project_file.exists():
        project_file.write_text(project_prose(prose))
    train_docs, held_docs = documents(template, project_file.read_text())
    leaked = shingles(prose) & shingles("\n".join(t for _, t in train_docs))
    print(f"held-out prose: {len(leaked)} of its 8-word sequences also occur in the training text", flush=True)
    tok = train_tokenizer([t for _, t in train_docs], a.vocab)
    V = tok.get_vocab_size(with_added_tokens=True)
    stream = [i for k, t in train_docs for i in encode(tok, k, t)]
    held_in = windows([i for k, t in held_docs for i in encode(tok, k, t)], a.seq)
    prose_ids = tok.encode(prose, add_special_tokens=False).ids
    held_out = windows(prose_ids, a.seq)
    chars = sum(len(t) for _, t in train_docs)
    print(f"data: {len(train_docs)} training documents, {chars} chars, {len(stream)} tokens (vocab {V}); "
          f"held out: {sum(len(w) for w in held_in)} in-domain tokens, {len(prose_ids)} tokens of project prose; "
          f"{time.time() - t0:.0f}s", flush=True)

    c = make_config(V)
    model, mtp = build_models(c)
    params = {id(p): p for p in list(model.parameters()) + list(mtp.parameters())}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    warm = max(a.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(max(s - warm, 0) / max(a.steps - warm, 1), 1.0))) * 0.9 + 0.1))
    residual_dropout(model, mtp, a.dropout)
    rs = routers(model, mtp)
    loads = track_loads(rs)
    data = torch.tensor(stream)
    g = torch.Generator().manual_seed(a.seed)
    print(f"model: {sum(p.numel() for p in params) / 1e6:.2f}M parameters; {a.steps} steps of "
          f"{a.batch}x{a.seq} tokens", flush=True)

    def evaluate(wins):
        model.eval()
        mtp.eval()
        with torch.no_grad():
            tot = [0.0, 0.0]
            for i in range(0, len(wins), 16):
                b = [w for w in wins[i:i + 16] if len(w) == a.seq]
                if b:
                    m, t = losses(model, mtp, torch.tensor(b))
                    tot[0] += m.item() * len(b)
                    tot[1] += t.item() * len(b)
            n = sum(1 for w in wins if len(w) == a.seq)
        model.train()
        mtp.train()
        return tot[0] / n, tot[1] / n

    run_main = run_mtp = None
    for step in range(a.steps):
        starts = torch.randint(0, len(data) - a.seq, (a.batch,), generator=g)
        x = torch.stack([data[s:s + a.seq] for s in starts])
        for l in loads:
            l.zero_()
        main, mtpl = losses(model, mtp, x)
        loss = main + a.mtp_lambda * mtpl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # auxiliary-loss-free balancing: the bias only steers choice
            for r, l in zip(rs, loads):
                r.e_score_correction_bias += a.gamma * torch.sign(l.mean() - l)
        run_main = main.item() if run_main is None else 0.95 * run_main + 0.05 * main.item()
        run_mtp = mtpl.item() if run_mtp is None else 0.95 * run_mtp + 0.05 * mtpl.item()
        if step % 20 == 0 or step == a.steps - 1:
            imb = [(l.max() / l.mean()).item() for l in loads]
            print(f"step {step:5d}  train CE {run_main:.3f}  MTP CE {run_mtp:.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"expert load max/mean {sum(imb) / len(imb):.2f} (worst layer {max(imb):.2f})  "
                  f"{time.time() - t0:.0f}s", flush=True)
        if (step + 1) % a.eval_every == 0 or step == a.steps - 1:
            hi, ho = evaluate(held_in), evaluate(held_out)
            print(f"eval  {step + 1:5d}  held-out CE {hi[0]:.3f} (MTP {hi[1]:.3f})  project prose CE {ho[0]:.3f} "
                  f"(MTP {ho[1]:.3f})  ln V {math.log(V):.3f}", flush=True)

    train_secs = time.time() - t0
    tok.save(str(out / "tokenizer.json"))
    tcfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": SPECIAL[0], "eos_token": SPECIAL[1],
            "pad_token": SPECIAL[1], "add_bos_token": True, "add_eos_token": False, "model_max_length": 16384,
            "chat_template": template}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}, indent=2))
    (out / "heldout.txt").write_text(prose)
    model.eval()
    mtp.eval()
    export(model, mtp, c, str(out))
    ce = heldout_ce(str(out), held_out)
    ce_in = heldout_ce(str(out), held_in)
    meta = {
        "command": "nice -n 10 python tools/train_demo.py " + " ".join(sys.argv[1:]),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "train_text_sha256": hashlib.sha256("".join(t for _, t in train_docs).encode()).hexdigest(),
        "train_tokens": len(stream), "vocab_size": V, "ln_vocab": math.log(V), "steps": a.steps,
        "tokens_seen": a.steps * a.batch * a.seq, "train_seconds": round(train_secs),
        "heldout": "heldout.txt: prose of " + ", ".join(HELDOUT_SOURCES) + " (not trained on)",
        "heldout_window": a.seq, "heldout_tokens": sum(len(w) - 1 for w in held_out),
        "heldout_ce": ce, "heldout_ce_over_ln_vocab": ce / math.log(V),
        "heldout_nats_per_byte": ce * sum(len(w) - 1 for w in held_out) / len(prose.encode()),
        "in_domain_heldout_ce": ce_in, "in_domain_heldout_ce_over_ln_vocab": ce_in / math.log(V),
        "heldout_shared_8grams_with_training": len(leaked),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
