"""Every CPU kernel path (`MLASERVE_KERNEL`) against transformers and the float64 FP8 dequantisation,
through `mlaserve logits`. A path this CPU lacks is skipped with the reason (the binary refuses it)."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

import ds3_reference
from conftest import checkpoint, ids_arg, mlaserve, reference

PATHS = ["avx512bf16", "avx512", "avx2", "neon", "portable"]


def prompt(seed, n, vocab):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def logits(tmp_path, kernel, model, ids, *extra):
    out = tmp_path / f"{kernel}-{abs(hash((str(model), tuple(ids), extra)))}.safetensors"
    env = dict(os.environ, MLASERVE_KERNEL=kernel)
    p = mlaserve("logits", "--model", model, "--ids", ids_arg(ids), "--out", out, *extra, env=env, check=False)
    if p.returncode != 0 and "this CPU lacks it" in p.stderr:
        pytest.skip(f"kernel path {kernel}: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr
    log = re.sub(r"\x1b\[[0-9;]*m", "", p.stderr)
    named = "" if kernel == "auto" else f'{kernel}"'
    assert f'kernel="{named}' in log, "the load log names the kernel path"
    return load_file(out), log


@pytest.fixture(scope="module")
def fp8_models():
    return [
        checkpoint("fp8", "fp8", dtype="bf16", fp8=True),  # partial edge blocks everywhere, MTP
        checkpoint("fp8-qnull", "tiny-qnull", dtype="bf16", fp8=True),  # q_lora_rank null
        # 16 x 64 blocks: each head of kv_b starts on a block row, so the absorption matrices stay
        # FP8 (W_UK transposed block by block), as with V3's 128 x 128 and 128-wide heads.
        checkpoint("fp8-heads", "tiny", dtype="bf16", fp8=True, fp8_block=(16, 64)),
    ]


@pytest.mark.parametrize("kernel", PATHS)
def test_fp32_matches_transformers(tiny, tmp_path, kernel):
    model, _ = reference(tiny)
    vocab = model.config.vocab_size
    for i, n in enumerate([1, 9, 37]):
        ids = prompt(900 + i, n, vocab)
        ours, _ = logits(tmp_path, kernel, tiny, ids)
        ref = ds3_reference.logits(model, None, ids)["logits"]
        assert (ours["logits"] - ref).abs().max().item() <= 1e-4, (kernel, n)


@pytest.mark.parametrize("kernel", PATHS)
def test_fp8_native_matches_float64_dequantisation(fp8_models, tmp_path, kernel):
    """FP8 weights read as FP8 by the kernel (block scales once per block of the reduction), fp32
    activations, against transformers on the exact float64 dequantisation."""
    for m in fp8_models:
        model, mtp = reference(m.parent / f"{m.name}-deq")
        has_mtp = mtp is not None
        for i, n in enumerate([5, 30]):
            ids = prompt(950 + i, n, model.config.vocab_size)
            extra = ("--mtp",) if has_mtp else ()
            ours, log = logits(tmp_path, kernel, m, ids, *extra)
            assert "weights=native (" in log and "fp8 " in log, "the load log reports FP8 held as FP8"
            held = log.split("weights=native (")[1].split(")")[0]
            # Head-aligned blocks keep kv_b's absorption matrices FP8; others dequantise them (f32).
            assert ("f32" in held) == (m.name != "fp8-heads"), held
            ref = ds3_reference.logits(model, mtp, ids, with_mtp=has_mtp)
            assert (ours["logits"] - ref["logits"]).abs().max().item() <= 1e-4, (kernel, m.name, n)
            if has_mtp:
                assert (ours["mtp_logits"] - ref["mtp_logits"]).abs().max().item() <= 1e-4


def test_fp8_converted_formats(fp8_models, tmp_path):
    """`--weights f32` dequantises exactly (same logits as native within f32 rounding); `--weights
    bf16` rounds the dequantised weights and stays close; the log says which was held."""
    m = fp8_models[0]
    ids = prompt(970, 17, 384)
    native, _ = logits(tmp_path, "auto", m, ids)
    f32, log32 = logits(tmp_path, "auto", m, ids, "--weights", "f32")
    bf16, log16 = logits(tmp_path, "auto", m, ids, "--weights", "bf16")
    assert "weights=f32 (f32 " in log32 and "fp8" not in log32.split("weights=")[1].split(")")[0]
    assert "weights=bf16 (bf16 " in log16
    assert (native["logits"] - f32["logits"]).abs().max().item() <= 1e-4
    diff = (native["logits"] - bf16["logits"]).abs().max().item()
    assert 0 < diff <= 0.05 * native["logits"].abs().max().item()


def test_unknown_or_missing_path_is_refused(tiny, tmp_path):
    p = mlaserve("logits", "--model", tiny, "--ids", "1,2", "--out", tmp_path / "x.safetensors",
                 env=dict(os.environ, MLASERVE_KERNEL="sse9"), check=False)
    assert p.returncode != 0 and "MLASERVE_KERNEL" in p.stderr and "sse9" in p.stderr
