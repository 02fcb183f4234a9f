"""The 2-stage pipeline on one machine against 1 stage, under 32 streams: `mlaserve serve --stages 1`
and `--stages 2` (cost-balanced split) on the benchmark checkpoint, `mlaserve bench` closed loop,
alternating rounds (A B A B); prints output tokens/s of each and the ratio per round and its median.
Figures only.

  python benches/two_stage.py [--rounds 3] [--concurrency 32] [--requests 96]
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import speculative  # noqa: E402
from serving_vs_transformers import Serve, bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    model = speculative.checkpoints(cache, ["random"])["random"]
    servers = {p: Serve(a.bin, model, p, a.dtype) for p in (1, 2)}
    try:
        for s in servers.values():
            s.wait_ready()
        rows = []
        for r in range(a.rounds):
            got = {p: bench(a.bin, s.addr, a.concurrency, a.requests, a.prompt_len, a.new_tokens)["output_tokens_per_sec"]
                   for p, s in servers.items()}
            rows.append(got)
            print(f"round {r + 1}: 1 stage {got[1]:.1f} tok/s, 2 stages {got[2]:.1f} tok/s, ratio {got[2] / got[1]:.3f}",
                  flush=True)
    finally:
        for s in servers.values():
            s.stop()
    ratios = sorted(x[2] / x[1] for x in rows)
    print(f"\n{a.concurrency} streams, {a.dtype}, {a.prompt_len}-token prompts, {a.new_tokens} new tokens; "
          f"{speculative.cpu_name()} x{os.cpu_count()}: 2 stages / 1 stage median {ratios[len(ratios) // 2]:.3f} "
          f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
