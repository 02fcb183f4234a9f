"""Serving throughput next to transformers `generate`, same checkpoint, same workload, same run.

Workload: prompts of --prompt-len random tokens, --new-tokens generated tokens each (EOS ignored),
bf16. Reports, each as a ratio measured here:
  - batch-1 decode: mlaserve (router + 1 worker, one stream) vs transformers generate at batch 1;
  - 32 concurrent streams through router + worker vs transformers' static batch 8 (aggregate tok/s);
  - a 2-stage loopback pipeline vs a single stage under the same 32-stream load;
  - router overhead: CPU time the router process used, as a share of the run's wall time.
Figures only (this is a benchmark, not a test).

  python benches/serving_vs_transformers.py [--bin target/release/mlaserve] [--json-out FILE]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import torch  # noqa: E402

from decode_vs_transformers import bench_checkpoint, prompts, theirs  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


class Serve:
    """`mlaserve serve` with P stages on a free port."""

    def __init__(self, binary, model, stages, dtype, extra=()):
        self.binary = binary
        self.port = free_port()
        # No HTTP port: several benchmark servers may run at once.
        self.p = subprocess.Popen([binary, "serve", "--model", str(model), "--listen", f"127.0.0.1:{self.port}",
                                   "--http-listen", "",
                                   "--stages", str(stages), "--dtype", dtype, *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("mlaserve serve exited")
            if line.startswith("MLASERVE_LISTENING router"):
                break
        self.addr = f"127.0.0.1:{self.port}"

    def wait_ready(self):
        """Until a tiny request succeeds (bench refuses while the pipeline is not up)."""
        for _ in range(300):
            try:
                bench(self.binary, self.addr, 1, 1, 4, 2)
                return
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        raise TimeoutError(f"mlaserve serve on {self.addr} did not become ready")

    def stop(self):
        self.p.terminate()
        self.p.wait(30)


def bench(binary, addr, concurrency, requests, prompt_len, new_tokens):
    out = subprocess.run([binary, "bench", "--target", addr, "--concurrency", str(concurrency), "--requests",
                          str(requests), "--warmup", str(min(concurrency, 8)), "--prompt-len", str(prompt_len),
                          "--output-len", str(new_tokens), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def serving_run(binary, model, stages, dtype, concurrency, requests, prompt_len, new_tokens):
    s = Serve(binary, model, stages, dtype)
    try:
        s.wait_ready()
        router_cpu0 = cpu_seconds(s.p.pid)
        t0 = time.time()
        r = bench(binary, s.addr, concurrency, requests, prompt_len, new_tokens)
        wall = time.time() - t0
        r["router_cpu_share"] = (cpu_seconds(s.p.pid) - router_cpu0) / wall
        return r
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    model = bench_checkpoint(cache)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    res = {"machine": {"cpus": os.cpu_count(), "cpu": open("/proc/cpuinfo").read().split("model name")[1].split(
        "\n")[0].strip(": ")}, "dtype": a.dtype, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}

    if not a.skip_transformers:
        for b in (1, 8):
            t = theirs(model, prompts(b, a.prompt_len, vocab), a.new_tokens, a.dtype)
            res[f"transformers_batch{b}_tok_s"] = b * a.new_tokens / t["total_secs"]

    one = serving_run(a.bin, model, 1, a.dtype, 1, 8, a.prompt_len, a.new_tokens)
    res["mlaserve_1stream_tok_s"] = one["output_tokens_per_sec"]
    res["mlaserve_1stream_tpot_ms"] = one["tpot_secs"]["mean"] * 1e3
    s1 = serving_run(a.bin, model, 1, a.dtype, 32, a.requests, a.prompt_len, a.new_tokens)
    res["mlaserve_32streams_1stage_tok_s"] = s1["output_tokens_per_sec"]
    res["router_cpu_share_32streams"] = s1["router_cpu_share"]
    s2 = serving_run(a.bin, model, 2, a.dtype, 32, a.requests, a.prompt_len, a.new_tokens)
    res["mlaserve_32streams_2stage_tok_s"] = s2["output_tokens_per_sec"]
    res["pipeline_2stage_vs_1stage"] = s2["output_tokens_per_sec"] / s1["output_tokens_per_sec"]
    if not a.skip_transformers:
        res["batch1_ratio"] = res["mlaserve_1stream_tok_s"] / res["transformers_batch1_tok_s"]
        res["streams32_vs_transformers_batch8"] = s1["output_tokens_per_sec"] / res["transformers_batch8_tok_s"]

    print(f"\n{a.dtype}, {a.prompt_len}-token prompts, {a.new_tokens} new tokens, {res['machine']}")
    for k, v in res.items():
        if isinstance(v, float):
            print(f"  {k:<40} {v:10.3f}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
