#!/usr/bin/env python3
"""FP8 weights held as FP8: mlaserve `--weights native` against `--weights bf16` of the same FP8
checkpoint, and against llama.cpp q8_0 of the same weights, side by side in one run.

The FP8 checkpoint is the benchmark shape of `decode_vs_transformers.py` (same seed, so the same
weights before quantisation), with every matrix DeepSeek-V3 stores in FP8 quantised to e4m3 with
128 x 128 block scales (embeddings, lm_head, norms and router gates stay bf16, as in V3). llama.cpp
gets the bf16 checkpoint converted to GGUF and `llama-quantize`d to q8_0 (it has no e4m3 format:
it requantises). Runs alternate A B C A B C, `--rounds` times; each figure is the best round:

  peak RSS         mlaserve generate (wait4 of the process)        -
  decode batch 1   generate, 32-token prompt, N new tokens          llama-batched-bench -npl 1
  prefill 512      generate, one 512-token prompt (one chunk)       llama-bench -p 512

Usage: python benches/fp8.py [--threads 2] [--rounds 2] [--new-tokens 64] [--json OUT]
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import hostinfo  # noqa: E402
import llamacpp  # noqa: E402
from decode_vs_transformers import bench_checkpoint, prompts  # noqa: E402


def fp8_checkpoint(cache: Path) -> Path:
    import ds3_checkpoint

    out = cache / "bench-checkpoint-fp8"
    if not (out / ".done").exists():
        print("[fp8] building the FP8 benchmark checkpoint", file=sys.stderr, flush=True)
        ds3_checkpoint.build(str(out), "bench", seed=0, dtype="bf16", fp8=True)
        (out / ".done").write_text("ok")
    return out


def generate(binary, model, weights, threads, batch, prompt_len, new_tokens):
    """(stats, peak RSS bytes, stderr) of one `mlaserve generate` process."""
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    args = [binary, "generate", "--model", str(model), "--weights", weights, "--dtype", "bf16",
            "--max-new-tokens", str(new_tokens), "--json", "--stats"]
    for p in prompts(batch, prompt_len, vocab):
        args += ["--ids", ",".join(map(str, p))]
    env = dict(os.environ, MLASERVE_THREADS=str(threads))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(err[-4000:])
        raise RuntimeError("mlaserve generate failed")
    err = re.sub(r"\x1b\[[0-9;]*m", "", err)
    return json.loads(err.strip().splitlines()[-1]), usage.ru_maxrss * 1024, err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("MLASERVE_BIN", str(ROOT / "target" / "release" / "mlaserve")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    fp8 = fp8_checkpoint(cache)
    bindir = llamacpp.build(cache)
    q8 = llamacpp.quantize(bindir, llamacpp.convert(cache, bench_checkpoint(cache), sys.executable))
    cpu = hostinfo.cpu()
    print(f"CPU: {cpu}", file=sys.stderr)
    runs = {"native": [], "bf16": [], "q8_0": []}
    kernel = None
    for r in range(a.rounds):
        for weights in ("native", "bf16"):
            d, rss, err = generate(a.bin, fp8, weights, a.threads, 1, 32, a.new_tokens)
            p, _, _ = generate(a.bin, fp8, weights, a.threads, 1, 512, 1)
            kernel = kernel or next((ln for ln in err.splitlines() if "kernel=" in ln), None)
            runs[weights].append({"decode_b1": d["decode_tokens_per_sec"], "prefill_512": 512 / p["prefill_secs"],
                                  "peak_rss_mb": rss / 1e6})
            print(f"[fp8] round {r} {weights}: {runs[weights][-1]}", file=sys.stderr, flush=True)
        rows = llamacpp.batched_bench(bindir, q8, a.threads, 32, a.new_tokens, (1,))
        pp = llamacpp.bench(bindir, q8, a.threads, prompts=(512,))
        runs["q8_0"].append({"decode_b1": rows[1]["speed_tg"], "prefill_512": pp["pp512"]})
        print(f"[fp8] round {r} llama.cpp q8_0: {runs['q8_0'][-1]}", file=sys.stderr, flush=True)
    best = {k: {f: max(x[f] for x in v) if f != "peak_rss_mb" else min(x[f] for x in v) for f in v[0]}
            for k, v in runs.items()}
    res = {"cpu": cpu, "threads": a.threads, "kernel_log": kernel, "runs": runs, "best": best}
    n, b, q = best["native"], best["bf16"], best["q8_0"]
    print(f"\nFP8 benchmark shape, {a.threads} threads, best of {a.rounds} rounds; CPU {cpu['model']}, "
          f"{cpu['cpus']} CPUs, flags {' '.join(cpu['flags'])}")
    print(f"mlaserve kernel path: {kernel.split('kernel=')[1].split()[0] if kernel else 'not reported'}")
    print(f"{'figure':<18}{'native (fp8)':>14}{'bf16':>10}{'q8_0':>10}{'native/bf16':>13}{'native/q8_0':>13}")
    for f in ("decode_b1", "prefill_512"):
        print(f"{f:<18}{n[f]:>14.1f}{b[f]:>10.1f}{q[f]:>10.1f}{n[f] / b[f]:>12.2f}x{n[f] / q[f]:>12.2f}x")
    print(f"{'peak RSS (MB)':<18}{n['peak_rss_mb']:>14.0f}{b['peak_rss_mb']:>10.0f}{'-':>10}"
          f"{n['peak_rss_mb'] / b['peak_rss_mb']:>12.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
