"""The host form of a decode step (`crates/model/src/host_step.rs`, the default on the CPU) against
the tensor form: `MLASERVE_DECODE_STEP=check` runs both forms on every step the host form takes and
fails the step unless its output and cache writes are bitwise equal, and `tensor` keeps every step
on the tensor form."""

import json
import os

import pytest
import torch

from conftest import checkpoint, ids_arg, mlaserve


def prompt(seed, n, vocab):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def run(model, prompts, form, *extra):
    args = ["generate", "--model", model, "--max-new-tokens", 12, "--json", "--stats", "--step-tokens", 11, *extra]
    for p in prompts:
        args += ["--ids", ids_arg(p)]
    p = mlaserve(*args, env={**os.environ, "MLASERVE_DECODE_STEP": form})
    stats = next(json.loads(line) for line in p.stderr.splitlines() if line.startswith('{"prefill_secs"'))
    return [json.loads(line)["ids"] for line in p.stdout.strip().splitlines()], stats


CASES = {
    "f32": (lambda: checkpoint("tiny-f32", "tiny", dtype="f32"), ["--dtype", "f32"]),
    "bf16": (lambda: checkpoint("tiny-f32", "tiny", dtype="f32"), ["--dtype", "bf16"]),
    "q-plain-bf16": (lambda: checkpoint("qnull", "tiny-qnull", dtype="f32"), ["--dtype", "bf16"]),
    # FP8 weights: row-permuted projections, and a dense MLP (split gate/up) left to the tensor form.
    "fp8-bf16": (lambda: checkpoint("fp8", "fp8", dtype="bf16", fp8=True), ["--dtype", "bf16"]),
    "fp8-f32": (lambda: checkpoint("fp8", "fp8", dtype="bf16", fp8=True), ["--dtype", "f32"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_host_form_equals_tensor_form(case):
    make, extra = CASES[case]
    model = make()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    # Decodes alone and together, beside chunked prefills (steps the host form leaves alone).
    prompts = [prompt(70 + i, n, vocab) for i, n in enumerate([1, 4, 9, 17, 40])]
    checked, stats = run(model, prompts, "check", *extra)
    assert stats["checked_steps"] >= 11, stats  # every step after the prompts' chunks
    tensor, stats = run(model, prompts, "tensor", *extra)
    assert stats["checked_steps"] == 0
    host, _ = run(model, prompts, "host", *extra)
    assert checked == tensor == host
