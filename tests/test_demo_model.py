"""The trained demo model (crates/mlaserve/assets/demo-model, made by tools/train_demo.py): the binary
serves exactly the shipped files, mlaserve's logits reproduce the held-out loss recorded at training
time, transformers agrees on the same files, and chat replies come back as words."""

import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import BIN, ROOT, ids_arg, mlaserve, reference
from harness import cluster

sys.path.insert(0, str(ROOT / "tools"))
import train_demo  # noqa: E402

ASSETS = ROOT / "crates" / "mlaserve" / "assets" / "demo-model"


def test_heldout_text_is_not_in_the_training_text():
    """The held-out prose shares no long word sequence with what the model was trained on (the
    project's trainable prose drops any paragraph that does; the count is recorded at training)."""
    held = (ASSETS / "heldout.txt").read_text()
    project = (ROOT / "tools" / "demo_project_corpus.txt").read_text()
    assert not train_demo.shingles(held) & train_demo.shingles(project)
    assert held == (ROOT / "tools" / "demo_heldout.txt").read_text()
    assert META["heldout_shared_8grams_with_training"] <= 5
META = json.loads((ASSETS / "training.json").read_text())


@pytest.fixture(scope="module")
def demo_dir():
    """What `mlaserve demo-model` (and `serve` without --model) uses."""
    return Path(mlaserve("demo-model").stdout.strip())


@pytest.fixture(scope="module")
def windows():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    ids = tok.encode((ASSETS / "heldout.txt").read_text(), add_special_tokens=False).ids
    return train_demo.windows(ids, META["heldout_window"])


def mlaserve_logits(model, ids, out, mtp=False):
    mlaserve("logits", "--model", model, "--ids", ids_arg(ids), "--dtype", "f32", *(["--mtp"] if mtp else []),
             "--out", out)
    return load_file(str(out))


def nll(logits, ids):
    return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum").item()


def test_binary_serves_the_shipped_checkpoint(demo_dir):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt"):
        assert (demo_dir / f).read_bytes() == (ASSETS / f).read_bytes(), f
    size = sum(p.stat().st_size for p in ASSETS.iterdir())
    assert size < 8.5e6, f"the shipped checkpoint should stay small: {size / 1e6:.1f} MB"


def test_heldout_loss_reproduces_through_mlaserve_and_transformers(demo_dir, windows, tmp_path):
    assert sum(len(w) - 1 for w in windows) == META["heldout_tokens"]

    def ours(i):
        return nll(mlaserve_logits(demo_dir, windows[i], tmp_path / f"w{i}.safetensors")["logits"], windows[i])

    with ThreadPoolExecutor(2) as ex:
        total = sum(ex.map(ours, range(len(windows))))
    ce = total / META["heldout_tokens"]
    model, mtp = reference(demo_dir, "f32")
    theirs = sum(nll(train_demo.ds3_reference.logits(model, mtp, w)["logits"], w) for w in windows)
    ce_t = theirs / META["heldout_tokens"]
    lnv = math.log(META["vocab_size"])
    print(f"held-out CE: mlaserve {ce:.4f}, transformers {ce_t:.4f}, recorded {META['heldout_ce']:.4f} "
          f"nats/token; ln V = {lnv:.3f} (ratio {ce / lnv:.3f})")
    assert abs(ce - META["heldout_ce"]) < 0.01
    assert abs(ce_t - META["heldout_ce"]) < 0.01
    assert abs(ce - ce_t) < 0.005
    # The target: well under a uniform guess on English it was not trained on.
    assert ce <= 0.6 * lnv, f"held-out CE {ce:.3f} = {ce / lnv:.3f} ln V"


def test_mtp_logits_agree_with_transformers(demo_dir, windows, tmp_path):
    w = windows[3]
    ours = mlaserve_logits(demo_dir, w, tmp_path / "m.safetensors", mtp=True)
    model, mtp = reference(demo_dir, "f32")
    ref = train_demo.ds3_reference.logits(model, mtp, w, with_mtp=True)
    for k in ("logits", "mtp_logits"):
        diff = (ours[k] - ref[k]).abs().max().item()
        agree = (ours[k].argmax(-1) == ref[k].argmax(-1)).float().mean().item()
        print(f"{k}: max |diff| {diff:.2e}, argmax agreement {agree:.1%}")
        assert diff < 2e-3 and agree > 0.99
    # The MTP head predicts t+2 far better than chance on text it was not trained on.
    ce_mtp = F.cross_entropy(ours["mtp_logits"][:-1], torch.tensor(w[2:])).item()
    assert ce_mtp < 0.85 * math.log(META["vocab_size"])


WORD = re.compile(r"[A-Za-z]{2,}")


QUESTIONS = ["Hello, how are you?", "What does a list do?", "Tell me about the router.", "How do I open a file?"]


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_chat_replies_in_words(demo_dir, temperature):
    with cluster(demo_dir, stages=1, dtype="bf16") as (addr, _, _):
        outs = [subprocess.run([str(BIN), "chat", "--target", addr, "--max-new-tokens", "48", "--temperature",
                                temperature, "--seed", "7", q], capture_output=True, text=True, timeout=120,
                               check=True).stdout for q in QUESTIONS]
    total = []
    for q, out in zip(QUESTIONS, outs):
        print(f"T={temperature} {q!r}: {out!r}")
        assert "\ufffd" not in out
        # A sentence, not a fragment (the model ends short answers with EOS, as it learned from chats).
        assert len(out.split()) >= 3, out
        total += out.split()
    assert len(total) >= 15, outs
    # Mostly words: tokens made of letters (punctuation attached) rather than fragments.
    wordy = [w for w in total if WORD.search(w)]
    assert len(wordy) >= 0.6 * len(total), outs
