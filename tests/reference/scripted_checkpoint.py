"""A constructed checkpoint whose greedy output is a chosen token sequence, to drive reasoning and
tool calls through the servers. Every attention and MLP output projection is zero, so the hidden state
is the current token's embedding; embeddings are one-hot and lm_head maps each token to its chosen
successor (tokens without one lead to EOS). The tokenizer is a word-level one whose pieces are the
script's words and DeepSeek's markers, with a concatenating decoder."""

import json
import os
from pathlib import Path

import torch

import ds3_checkpoint as ck

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL = [BOS, EOS, USER, ASSISTANT, "<unk>"]
MARKERS = ["<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
           "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
           "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
# After the chat prompt's "<｜Assistant｜>": reasoning, content, one V3-format tool call, EOS.
CHAT_SCRIPT = ["<think>", "Let", " me", " think", "</think>", "Sure", ".", "<｜tool▁calls▁begin｜>",
               "<｜tool▁call▁begin｜>", "function", "<｜tool▁sep｜>", "get_weather", "\n```json\n",
               '{"city": "Paris"}', "\n```", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"]
# After a completion prompt ending in "go".
COMPLETION_SCRIPT = ["Hello", " world", "!"]
WORDS = ["Let", " me", " think", "Sure", ".", "function", "get_weather", "\n```json\n", '{"city": "Paris"}',
         "\n```", "go", "Hello", " world", "!"]
VOCAB = 64


def vocab() -> list:
    v = SPECIAL + MARKERS + WORDS
    return v + [f"<pad_{i}>" for i in range(VOCAB - len(v))]


def successors() -> dict:
    v = {t: i for i, t in enumerate(vocab())}
    succ = {}
    for prev, script in ((ASSISTANT, CHAT_SCRIPT), ("go", COMPLETION_SCRIPT)):
        chain = [prev, *script, EOS]
        for a, b in zip(chain, chain[1:]):
            succ[v[a]] = v[b]
    return succ


def write_tokenizer(out: Path, template: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    v = vocab()
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(v)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False) for t in MARKERS])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "model_max_length": 163840,
        "chat_template": template,
    }, ensure_ascii=False, indent=1))


def build(out: Path, template: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    c = ck.make_config("tiny", mtp_agrees=True)
    c["vocab_size"] = VOCAB
    H = c["hidden_size"]
    assert VOCAB <= H, "one-hot embeddings need hidden_size >= vocab"
    w = ck.make_weights(c, seed=0, mtp_agrees=True)
    L = c["num_hidden_layers"]
    emb = torch.zeros(VOCAB, H, dtype=torch.float64)
    emb[torch.arange(VOCAB), torch.arange(VOCAB)] = 1.0
    head = torch.zeros(VOCAB, H, dtype=torch.float64)
    succ = successors()
    for i in range(VOCAB):
        head[succ.get(i, 1), i] = 4.0
    for k in ("model.embed_tokens.weight", f"model.layers.{L}.embed_tokens.weight"):
        w[k] = emb.clone()
    for k in ("lm_head.weight", f"model.layers.{L}.shared_head.head.weight"):
        w[k] = head.clone()
    for k in ("model.norm.weight", f"model.layers.{L}.shared_head.norm.weight"):
        w[k] = torch.ones(H, dtype=torch.float64)
    ck.save_checkpoint(str(out), c, w, dtype=torch.float32)
    write_tokenizer(out, template)
    return out


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1]), open(sys.argv[2]).read() if len(sys.argv) > 2 else ""))
