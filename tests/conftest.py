"""Shared fixtures: the mlaserve binary, random checkpoints cached by generator version, and helpers
to run the binary and the transformers reference."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reference"))

BIN = Path(os.environ.get("MLASERVE_BIN", ROOT / "target" / "release" / "mlaserve"))
# The `cuda` feature's build (`make build-cuda`): what the worker image runs; it also runs on CPU.
CUDA_BIN = Path(os.environ.get("MLASERVE_CUDA_BIN", ROOT / "target" / "release" / "mlaserve-cuda"))
CACHE = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))


def _generator_key() -> str:
    src = (ROOT / "tests" / "reference" / "ds3_checkpoint.py").read_bytes()
    return hashlib.sha256(src).hexdigest()[:12]


FIXTURES = CACHE / "fixtures" / _generator_key()


def checkpoint(name: str, preset: str, **kw) -> Path:
    """A random checkpoint, built once per generator version. Returns its directory; for FP8
    checkpoints the exact float64 dequantisation is also written as an fp32 checkpoint `<name>-deq`."""
    import ds3_checkpoint as ck
    import torch

    out = FIXTURES / name
    done = out / ".done"
    if not done.exists():
        c, exact = ck.build(str(out), preset, **kw)
        if kw.get("fp8"):
            deq = FIXTURES / f"{name}-deq"
            plain = dict(c)
            plain.pop("quantization_config")
            ck.save_checkpoint(str(deq), plain, exact, dtype=torch.float32)
        done.write_text("ok")
    return out


def mlaserve(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    assert BIN.exists(), f"{BIN} is missing: run `make build`"
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"mlaserve {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def ids_arg(ids) -> str:
    return ",".join(str(i) for i in ids)


def generate_json(model, prompts, max_new, *extra):
    args = ["generate", "--model", model, "--max-new-tokens", max_new, "--json", *extra]
    for p in prompts:
        args += ["--ids", ids_arg(p)]
    out = mlaserve(*args).stdout.strip().splitlines()
    return [json.loads(line)["ids"] for line in out]


_REF_CACHE = {}


def reference(model_dir, dtype="f32"):
    """transformers model (+ MtpModel), loaded once per checkpoint and dtype."""
    import ds3_reference

    key = (str(model_dir), dtype)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = ds3_reference.load(str(model_dir), dtype)
    return _REF_CACHE[key]


@pytest.fixture(scope="session")
def tiny():
    return checkpoint("tiny-f32", "tiny", dtype="f32")
