"""The `cuda` build of mlaserve (issue: worker service, expert shards combined over NCCL).

On every host: the cuda binary links libtorch_cuda, opens the wheel's `libnccl.so.2` through
cudarc (which looks for other names) and refuses clearly when there is no GPU; the CPU binary
refuses `--device cuda`. Where libtorch sees CUDA devices, the pipeline's greedy output on the GPU
must equal the CPU single process, with NCCL-combined expert shards when there are two devices.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, CUDA_BIN
from harness import cluster
from test_pipeline import concurrent_greedy, small, small_cases  # noqa: F401  (fixtures)


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def needed(binary) -> list:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def run(binary, *args, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "MLASERVE_NCCL_LIBRARY")}
    e.update(env or {})
    e["RUST_BACKTRACE"] = "0"
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e)


@pytest.fixture(scope="module")
def cuda_bin():
    assert CUDA_BIN.exists(), f"{CUDA_BIN} is missing: `make build-cuda` builds it"
    return CUDA_BIN


def test_only_the_cuda_binary_links_libtorch_cuda(cuda_bin):
    assert "libtorch_cuda.so" in needed(cuda_bin)
    assert "libtorch_cuda.so" not in needed(BIN)


def test_nccl_opens_through_the_wheels_libnccl_so_2(cuda_bin, small):
    """cudarc looks for libnccl.so(.13); the wheel has libnccl.so.2: the worker links it and re-executes."""
    p = run(cuda_bin, "worker", "--model", small, "--layers", "0..6", "--device", "cuda", "--expert-shards", 2,
            "--check")
    assert p.returncode == 0, p.stderr
    m = re.search(r"^# nccl (\d+)\.(\d+)\.(\d+)$", p.stdout, re.M)
    assert m and int(m[1]) == 2, p.stdout
    # The link it made points at the wheel's library.
    links = [d / "libnccl.so" for d in Path(os.environ.get("TMPDIR", "/tmp")).glob("mlaserve-nccl-*")]
    assert any(l.is_symlink() and os.readlink(l).endswith("libnccl.so.2") for l in links), links


def test_one_shard_needs_no_nccl(cuda_bin, small):
    p = run(cuda_bin, "worker", "--model", small, "--layers", "0..6", "--device", "cuda", "--check")
    assert p.returncode == 0, p.stderr
    assert "# nccl" not in p.stdout


def test_a_missing_nccl_library_is_a_clear_error(cuda_bin, small):
    p = run(cuda_bin, "worker", "--model", small, "--layers", "0..6", "--device", "cuda", "--expert-shards", 2,
            "--check", env={"MLASERVE_NCCL_LIBRARY": "/nonexistent/libnccl.so.2"})
    assert p.returncode != 0
    assert "/nonexistent/libnccl.so.2" in p.stderr, p.stderr


def test_cpu_binary_refuses_cuda(small):
    p = run(BIN, "worker", "--model", small, "--layers", "0..6", "--device", "cuda", "--listen", "127.0.0.1:0")
    assert p.returncode != 0
    assert "built with `--features cuda`" in p.stderr, p.stderr


@pytest.mark.skipif(gpus() > 0, reason="this host has a GPU")
def test_cuda_worker_without_a_gpu_fails_clearly(cuda_bin, small):
    p = run(cuda_bin, "worker", "--model", small, "--layers", "0..6", "--device", "cuda", "--listen",
            "127.0.0.1:0")
    assert p.returncode != 0
    assert "libtorch sees no CUDA device" in p.stderr, p.stderr


def _greedy_on_gpu(small, small_cases, stages, shards):  # noqa: F811
    args = ("--device", "cuda")
    with cluster(small, stages=stages, shards=shards, dtype="f32", worker_args=args, worker_bin=CUDA_BIN) as (
            addr, _, _):
        assert concurrent_greedy(addr, small_cases) == [c[1] for c in small_cases]


@pytest.mark.skipif(gpus() < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("stages", [1, 2])
def test_gpu_pipeline_greedy_equals_cpu(cuda_bin, small, small_cases, stages):  # noqa: F811
    _greedy_on_gpu(small, small_cases, stages, 1)


@pytest.mark.skipif(gpus() < 2, reason="needs two CUDA devices for NCCL expert shards")
def test_gpu_expert_shards_over_nccl_equal_cpu(cuda_bin, small, small_cases):  # noqa: F811
    _greedy_on_gpu(small, small_cases, 1, 2)
