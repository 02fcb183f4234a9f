"""Decode throughput of `mlaserve generate` next to transformers `generate`, same checkpoint, same run.

Builds (once, cached) the ~200M-parameter random DeepSeek-V3 benchmark checkpoint, then for each batch
size runs both on prompts of --prompt-len tokens for --new-tokens new tokens in bf16 and prints
tokens/s and the ratio. Figures, not assertions: this is a benchmark, not a test.

  python benches/decode_vs_transformers.py --bin target/release/mlaserve [--batches 1,16]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import torch  # noqa: E402

import ds3_checkpoint  # noqa: E402


def bench_checkpoint(cache: Path) -> Path:
    out = cache / "bench-checkpoint"
    if not (out / ".done").exists():
        print("building the benchmark checkpoint ...", file=sys.stderr)
        ds3_checkpoint.build(str(out), "bench", seed=0, dtype="bf16")
        (out / ".done").write_text("ok")
    return out


def prompts(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g).tolist()


def ours(binary, model, batch_prompts, new_tokens, dtype, threads):
    args = [binary, "generate", "--model", str(model), "--max-new-tokens", str(new_tokens), "--dtype", dtype,
            "--json", "--stats"]
    for p in batch_prompts:
        args += ["--ids", ",".join(map(str, p))]
    env = dict(os.environ, MLASERVE_THREADS=str(threads))
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    stats["total_secs"] = stats["prefill_secs"] + stats["decode_secs"]
    stats["wall_secs_incl_load"] = wall
    return stats


def theirs(model, batch_prompts, new_tokens, dtype):
    import ds3_reference

    m, _ = ds3_reference.load(str(model), dtype)
    x = torch.tensor(batch_prompts)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        m.generate(x[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        m.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.generate(x, **kw)
        total = time.perf_counter() - t0
    return {"total_secs": total, "prefill_secs": prefill, "decode_secs": max(total - prefill, 1e-9)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json-out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    model = bench_checkpoint(cache)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        ps = prompts(b, a.prompt_len, vocab)
        o = ours(a.bin, model, ps, a.new_tokens, a.dtype, a.threads)
        t = theirs(model, ps, a.new_tokens, a.dtype)
        # Both: all new tokens over generate time excluding model load (prompt prefill included).
        o_tps = b * a.new_tokens / o["total_secs"]
        t_tps = b * a.new_tokens / t["total_secs"]
        o_dec = o["decode_tokens_per_sec"]
        t_dec = b * (a.new_tokens - 1) / t["decode_secs"]
        rows.append(dict(batch=b, ours_tok_s=o_tps, transformers_tok_s=t_tps, ratio=o_tps / t_tps,
                         ours_decode_tok_s=o_dec, transformers_decode_tok_s=t_dec, decode_ratio=o_dec / t_dec))
    print(f"\n{a.dtype}, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, {a.threads} threads, "
          f"checkpoint {model}")
    print(f"{'batch':>5} {'mlaserve tok/s':>15} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'decode-only ratio':>18}")
    for r in rows:
        print(f"{r['batch']:>5} {r['ours_tok_s']:>15.1f} {r['transformers_tok_s']:>19.1f} {r['ratio']:>6.2f} "
              f"{r['decode_ratio']:>18.2f}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
