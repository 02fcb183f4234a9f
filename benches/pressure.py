"""Goodput under memory pressure: the same closed-loop load with a cache pool that holds everything
and with one that holds a fraction (default 25%) of what the concurrent requests need, in one run.
Prints output tokens/s, p99 TTFT and the preemptions the server made, and the ratios. Figures only.

  python benches/pressure.py [--checkpoint small|bench] [--concurrency 32] [--fraction 0.25]
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

from decode_vs_transformers import bench_checkpoint  # noqa: E402
from serving_vs_transformers import Serve  # noqa: E402


def small_checkpoint(cache: Path) -> Path:
    import ds3_checkpoint

    out = cache / "pressure-small-checkpoint"
    if not (out / ".done").exists():
        ds3_checkpoint.build(str(out), "small", seed=0, dtype="f32")
        (out / ".done").write_text("ok")
    return out


def bench(binary, addr, a):
    out = subprocess.run([binary, "bench", "--target", addr, "--concurrency", str(a.concurrency), "--requests",
                          str(a.requests), "--warmup", "0", "--prompt-len", str(a.prompt_len), "--output-len",
                          str(a.new_tokens), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run(a, model, blocks):
    s = Serve(a.bin, model, 1, a.dtype, extra=["--kv-blocks", str(blocks), "--block-size", str(a.block_size),
                                                "--max-batch-tokens", str(a.max_batch_tokens)])
    try:
        s.wait_ready()
        return bench(a.bin, s.addr, a)
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--checkpoint", choices=["small", "bench"], default="small")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--fraction", type=float, default=0.25)
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    model = small_checkpoint(cache) if a.checkpoint == "small" else bench_checkpoint(cache)
    per_seq = math.ceil((a.prompt_len + a.new_tokens) / a.block_size)
    demand = a.concurrency * per_seq
    tight = max(per_seq, int(demand * a.fraction))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"# {cpu} ({platform.machine()}, {os.cpu_count()} cores); load {os.getloadavg()[0]:.2f}")
    print(f"# {a.checkpoint} checkpoint, {a.dtype}; {a.concurrency} streams of {a.prompt_len}+{a.new_tokens} "
          f"tokens; demand {demand} blocks of {a.block_size}; tight pool {tight} ({tight / demand:.0%})")
    rows = {}
    for name, blocks in (("ample", demand + 8), ("tight", tight)):
        r = run(a, model, blocks)
        rows[name] = r
        errs = sum(r["errors"].values())
        print(f"{name:<6} blocks {blocks:>5}: {r['output_tokens_per_sec']:8.1f} output tok/s, p99 TTFT "
              f"{r['ttft_secs']['p99'] * 1e3:8.1f} ms, preemptions {r['preemptions']:>5}, completed "
              f"{r['completed']}/{r['requests']}, errors {errs}")
    t, f = rows["tight"], rows["ample"]
    print(f"tight/ample: goodput {t['output_tokens_per_sec'] / f['output_tokens_per_sec']:.2f}x, "
          f"p99 TTFT {t['ttft_secs']['p99'] / f['ttft_secs']['p99']:.2f}x")
    print(f"# load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
