"""Bytes sent between pipeline stages per token (worker-service issue), measured under load.

Two worker processes (layers split in half) and a router on loopback with the ~200M benchmark
checkpoint; `mlaserve bench` runs --concurrency streams; stage 0's own counters (Prometheus
/metrics: hidden-state bytes sent, tokens processed) give the bytes per token it forwarded and per
output token of the run. The hidden state alone is hidden_size x dtype bytes per token; the rest
is step framing (ids, positions, block tables, sampling parameters). Figures only.

  python benches/pipeline_traffic.py [--concurrency 32 --requests 64 --dtype bf16]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

from decode_vs_transformers import bench_checkpoint  # noqa: E402
from harness import BIN, start_router, start_worker, wait_healthy  # noqa: E402


def counter(addr, name) -> float:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$", text, re.M))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    model = bench_checkpoint(cache)
    cfg = json.loads((model / "config.json").read_text())
    half = cfg["num_hidden_layers"] // 2
    procs = []
    try:
        for layers in ((0, half), (half, cfg["num_hidden_layers"])):
            procs.append(start_worker(model, layers, dtype=a.dtype, kv_blocks=2048, threads=os.cpu_count(),
                                      extra=("--metrics-listen", "127.0.0.1:0")))
        router = start_router(model, [w.addr for w in procs])
        procs.append(router)
        wait_healthy(router.addr)
        m0 = procs[0].metrics_addr
        names = ("mlaserve_stage_hidden_bytes_total", "mlaserve_stage_sent_bytes_total", "mlaserve_stage_tokens_total")
        before = [counter(m0, n) for n in names]
        out = subprocess.run([str(BIN), "bench", "--target", router.addr, "--concurrency", str(a.concurrency),
                              "--requests", str(a.requests), "--warmup", "0", "--prompt-len", str(a.prompt_len),
                              "--output-len", str(a.new_tokens), "--json"], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout)
        hidden, sent, tokens = (counter(m0, n) - b for n, b in zip(names, before))
    finally:
        for p in reversed(procs):
            p.stop()
    raw = cfg["hidden_size"] * (2 if a.dtype == "bf16" else 4)
    print(f"\n2 stages, {a.dtype}, {a.concurrency} streams, {a.requests} requests of {a.prompt_len}+{a.new_tokens}")
    print(f"  stage 0 -> stage 1: {sent:,.0f} B of step messages ({hidden:,.0f} B hidden states) for "
          f"{tokens:,.0f} tokens processed")
    print(f"  per token forwarded:  {sent / max(tokens, 1):,.0f} B (hidden state {hidden / max(tokens, 1):,.0f} B; "
          f"{raw:,} B is hidden_size x dtype)")
    print(f"  per output token:     {sent / max(r['output_tokens'], 1):,.0f} B "
          f"(includes the prompts' {r['prompt_tokens']:,} tokens)")
    print(f"  throughput: {r['output_tokens_per_sec']:.1f} output tok/s")


if __name__ == "__main__":
    main()
