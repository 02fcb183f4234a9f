"""Prefix caching: requests sharing a long system prompt, with the cache on and off, in one run.

Each prompt is --shared tokens common to all requests followed by --unique tokens of its own (the
shape of a chat service with a fixed system prompt). `mlaserve serve` on the ~200M benchmark
checkpoint, once with `--prefix-caching false` and once with it on; `mlaserve bench` at the given
concurrency. Prints TTFT, throughput, the prompt blocks found in the cache, and the ratios.
Figures only.

  python benches/prefix_cache.py [--shared 480 --unique 32 --new-tokens 16 --concurrency 4]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

from decode_vs_transformers import bench_checkpoint  # noqa: E402
from serving_vs_transformers import Serve  # noqa: E402


def bench(binary, addr, a, requests, warmup):
    out = subprocess.run([binary, "bench", "--target", addr, "--concurrency", str(a.concurrency), "--requests",
                          str(requests), "--warmup", str(warmup), "--prompt-len", str(a.shared + a.unique),
                          "--shared-prefix", str(a.shared), "--output-len", str(a.new_tokens), "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run(a, model, caching):
    s = Serve(a.bin, model, 1, a.dtype, extra=["--prefix-caching", "true" if caching else "false"])
    try:
        s.wait_ready()
        # The warm-up requests also fill the cache with the shared prompt, as a running service has.
        return bench(a.bin, s.addr, a, a.requests, a.concurrency)
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shared", type=int, default=480)
    ap.add_argument("--unique", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    model = bench_checkpoint(cache)
    off = run(a, model, False)
    on = run(a, model, True)
    print(f"\n{a.dtype}, prompts of {a.shared} shared + {a.unique} own tokens, {a.new_tokens} new, "
          f"{a.concurrency} streams, {a.requests} requests")
    print(f"{'prefix cache':<13} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'e2e p50 s':>10} {'req/s':>7} "
          f"{'cached blocks':>14}")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:<13} {r['ttft_secs']['p50'] * 1e3:>12.1f} {r['ttft_secs']['p90'] * 1e3:>12.1f} "
              f"{r['e2e_secs']['p50']:>10.3f} {r['requests_per_sec']:>7.2f} {r['prefix_cache_hits']:>14}")
    print(f"TTFT p50 off/on: {off['ttft_secs']['p50'] / on['ttft_secs']['p50']:.2f}x, "
          f"requests/s on/off: {on['requests_per_sec'] / off['requests_per_sec']:.2f}x")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(dict(off=off, on=on), indent=2))


if __name__ == "__main__":
    main()
