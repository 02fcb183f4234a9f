"""The prepared GPU check (performance issue, "GPU"): one script for a session that is lent a GPU.

Needs only torch on the GPU machine, plus the stripped cuda binary carried there (`make gpu-bundle`
puts it at .gpu/mlaserve-cuda; it finds libtorch through LD_LIBRARY_PATH, set here from the
machine's torch). Steps, each printed as it finishes:
  1. device memory bandwidth: a device-to-device copy of --copy-gib GiB (read + write counted);
  2. parity: greedy `generate` on the GPU (f32) equals the same binary on the CPU (f32), which the
     CPU test suite ties to transformers, on the small random checkpoint; the same for an FP8
     checkpoint (`--weights native`: FP8 stays FP8 on the device); and in bf16, where the routed
     experts run as grouped products (`_grouped_mm`, routing counts on the device), the share of
     tokens equal to the CPU's bf16 (a figure: bf16 rounding differs between devices);
  3. decode step time in bf16 on the ~200M benchmark checkpoint at batch 1 and 32, against the floor
     (weight bytes a decode step must read: attention, dense and shared MLPs, lm_head, and the
     routed experts expected to be active for that batch, divided by the measured bandwidth).
Figures only; the parity line says PASS or FAIL.

  python benches/gpu_check.py [--bin .gpu/mlaserve-cuda] [--json-out $OUT/gpu.json]
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import ds3_checkpoint  # noqa: E402


def copy_bandwidth(gib: float) -> float:
    n = int(gib * (1 << 30)) // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * reps / (time.perf_counter() - t0)


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def decode_bytes(model: Path, batch: int) -> float:
    """bf16 weight bytes one decode step reads for `batch` sequences (MTP layer not counted)."""
    cfg = json.loads((model / "config.json").read_text())
    n_layers, e, k = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    active = 1 - (1 - k / e) ** batch  # expected share of a layer's routed experts chosen by someone
    total = 0.0
    for name, t in header(model / "model.safetensors").items():
        if name == "__metadata__" or "embed_tokens" in name:
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers:
            continue
        numel = 1
        for d in t["shape"]:
            numel *= d
        share = active if (".experts." in name) else 1.0
        total += 2 * numel * share
    return total


def generate(binary, model, device, dtype, prompts, new_tokens, weights=None):
    args = [binary, "generate", "--model", str(model), "--device", device, "--dtype", dtype,
            "--max-new-tokens", str(new_tokens), "--json", "--stats"]
    if weights:
        args += ["--weights", weights]
    for p in prompts:
        args += ["--ids", ",".join(map(str, p))]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:8])} ...: {r.stderr[-2000:]}")
    ids = [json.loads(l)["ids"] for l in r.stdout.splitlines() if l.startswith("{")]
    return ids, json.loads(r.stderr.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / ".gpu" / "mlaserve-cuda"))
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--work", default=os.environ.get("MLASERVE_CACHE", tempfile.gettempdir()))
    ap.add_argument("--json-out")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    os.environ["LD_LIBRARY_PATH"] = str(Path(torch.__file__).parent / "lib") + ":" + os.environ.get(
        "LD_LIBRARY_PATH", "")
    out = dict(device=torch.cuda.get_device_name(0), devices=torch.cuda.device_count())
    print(f"device: {out['device']} x{out['devices']}", flush=True)

    bw = copy_bandwidth(a.copy_gib)
    out["copy_gb_s"] = bw / 1e9
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s", flush=True)

    work = Path(a.work)
    small = work / "gpu-small-f32"
    if not (small / ".done").exists():
        ds3_checkpoint.build(str(small), "small", seed=0, dtype="f32", tokenizer=False)
        (small / ".done").write_text("ok")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 9, 17, 40)]
    cpu, _ = generate(a.bin, small, "cpu", "f32", prompts, 16)
    gpu, _ = generate(a.bin, small, "cuda", "f32", prompts, 16)
    same = sum(c == d for c, d in zip(cpu, gpu))
    out["parity"] = dict(prompts=len(prompts), identical=same)
    print(f"parity (greedy, f32, GPU vs CPU): {same}/{len(prompts)} identical -> "
          f"{'PASS' if same == len(prompts) else 'FAIL'}", flush=True)

    fp8 = work / "gpu-small-fp8"
    if not (fp8 / ".done").exists():
        ds3_checkpoint.build(str(fp8), "fp8", seed=0, dtype="bf16", fp8=True, tokenizer=False)
        (fp8 / ".done").write_text("ok")
    fp8_vocab = json.loads((fp8 / "config.json").read_text())["vocab_size"]
    fp8_prompts = [[t % fp8_vocab for t in p] for p in prompts]
    cpu8, _ = generate(a.bin, fp8, "cpu", "f32", fp8_prompts, 16, "native")
    gpu8, _ = generate(a.bin, fp8, "cuda", "f32", fp8_prompts, 16, "native")
    same8 = sum(c == d for c, d in zip(cpu8, gpu8))
    out["parity_fp8"] = dict(prompts=len(fp8_prompts), identical=same8)
    print(f"parity (greedy, f32 activations, FP8 weights native, GPU vs CPU): {same8}/{len(fp8_prompts)} "
          f"identical -> {'PASS' if same8 == len(fp8_prompts) else 'FAIL'}", flush=True)
    cpub, _ = generate(a.bin, small, "cpu", "bf16", prompts, 16)
    gpub, _ = generate(a.bin, small, "cuda", "bf16", prompts, 16)
    agree = [sum(x == y for x, y in zip(c, d)) / max(len(c), 1) for c, d in zip(cpub, gpub)]
    out["bf16_token_agreement"] = sum(agree) / len(agree)
    print(f"bf16 greedy tokens equal to the CPU's (grouped experts on the GPU): "
          f"{out['bf16_token_agreement']:.1%}", flush=True)

    bench = work / "gpu-bench-bf16"
    if not (bench / ".done").exists():
        ds3_checkpoint.build(str(bench), "bench", seed=0, dtype="bf16", tokenizer=False)
        (bench / ".done").write_text("ok")
    vocab = json.loads((bench / "config.json").read_text())["vocab_size"]
    out["decode"] = []
    for batch in (1, 32):
        ps = torch.randint(2, vocab, (batch, 32), generator=g).tolist()
        generate(a.bin, bench, "cuda", "bf16", ps[:1], 4)  # CUDA context, kernels, allocator warm
        _, st = generate(a.bin, bench, "cuda", "bf16", ps, 64)
        step = st["decode_secs"] / max(st["decode_steps"], 1)
        floor = decode_bytes(bench, batch) / bw
        row = dict(batch=batch, step_ms=step * 1e3, floor_ms=floor * 1e3, floor_share=floor / step,
                   tokens_per_sec=st["decode_tokens_per_sec"])
        out["decode"].append(row)
        print(f"decode bf16 batch {batch}: {row['step_ms']:.2f} ms/step, floor {row['floor_ms']:.3f} ms "
              f"({row['floor_share']:.1%} of it), {row['tokens_per_sec']:.0f} tok/s", flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
