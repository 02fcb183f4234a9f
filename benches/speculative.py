"""MTP speculative decoding: acceptance rate and speedup, measured side by side in one run.

Two checkpoints of the ~200M benchmark shape: the random one (its MTP head rarely agrees with the
main head) and one whose MTP head agrees with the main head by construction (the mechanism's
ceiling; see ds3_checkpoint.py --mtp-agrees). For each: `mlaserve serve` with and without
`--speculative mtp`, `mlaserve bench` at the given concurrency; prints tokens/s, the ratio and the
acceptance rate. Figures only.

  python benches/speculative.py [--concurrency 1,8] [--dtype bf16]
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import ds3_checkpoint  # noqa: E402
from serving_vs_transformers import Serve, bench  # noqa: E402


def checkpoints(cache: Path):
    out = {}
    for name, agrees in (("random", False), ("agreeing-mtp", True)):
        d = cache / f"bench-checkpoint{'-mtp-agrees' if agrees else ''}"
        if not (d / ".done").exists():
            print(f"building {d} ...", file=sys.stderr)
            ds3_checkpoint.build(str(d), "bench", seed=0, dtype="bf16", mtp_agrees=agrees)
            (d / ".done").write_text("ok")
        if not (d / "tokenizer.json").exists():
            ds3_checkpoint.write_tokenizer(str(d), 32768)
        out[name] = d
    return out


def run(binary, model, spec, dtype, concurrency, requests, prompt_len, new_tokens):
    s = Serve(binary, model, 1, dtype, extra=["--speculative", "mtp"] if spec else [])
    try:
        s.wait_ready()
        return bench(binary, s.addr, concurrency, requests, prompt_len, new_tokens)
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=8)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    rows = []
    for name, model in checkpoints(cache).items():
        for c in [int(x) for x in a.concurrency.split(",")]:
            requests = a.requests_per_stream * c
            base = run(a.bin, model, False, a.dtype, c, requests, a.prompt_len, a.new_tokens)
            spec = run(a.bin, model, True, a.dtype, c, requests, a.prompt_len, a.new_tokens)
            acc = spec["speculative_accepted"] / max(spec["speculative_drafts"], 1)
            rows.append(dict(model=name, concurrency=c, base_tok_s=base["output_tokens_per_sec"],
                             spec_tok_s=spec["output_tokens_per_sec"], speedup=spec["output_tokens_per_sec"]
                             / base["output_tokens_per_sec"], acceptance=acc))
    print(f"\n{a.dtype}, {a.prompt_len}-token prompts, {a.new_tokens} new tokens")
    print(f"{'model':<14} {'streams':>7} {'plain tok/s':>12} {'MTP tok/s':>10} {'speedup':>8} {'accepted':>9}")
    for r in rows:
        print(f"{r['model']:<14} {r['concurrency']:>7} {r['base_tok_s']:>12.1f} {r['spec_tok_s']:>10.1f} "
              f"{r['speedup']:>8.2f} {r['acceptance']:>9.1%}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
