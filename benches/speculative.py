"""MTP speculative decoding: acceptance rate and speedup, measured side by side in one run.

Checkpoints:
  - demo: the trained demo model (crates/mlaserve/assets/demo-model, tools/train_demo.py). Prompts are
    32-token slices of its held-out text (English it was not trained on), sent by a Python gRPC client
    (threads, one channel each), greedy and at temperature 0.7 (seeded); also `mlaserve bench` with
    random-id prompts for comparison with the rows below.
  - random: the ~200M benchmark shape with random weights (its MTP head rarely agrees).
  - agreeing-mtp: the same shape with an MTP head that agrees with the main head by construction
    (the mechanism's ceiling; see ds3_checkpoint.py --mtp-agrees).
For each: `mlaserve serve` with and without `--speculative mtp` at the given concurrency; prints
tokens/s, the ratio, the acceptance rate, the CPU and the load average. Figures only.

  python benches/speculative.py [--models demo,random,agreeing-mtp] [--concurrency 1,8] [--dtype bf16]
"""

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import ds3_checkpoint  # noqa: E402
from serving_vs_transformers import Serve, bench  # noqa: E402

DEMO = ROOT / "crates" / "mlaserve" / "assets" / "demo-model"


def checkpoints(cache: Path, names):
    out = {}
    for name in names:
        if name == "demo":
            out[name] = DEMO
            continue
        agrees = name == "agreeing-mtp"
        d = cache / f"bench-checkpoint{'-mtp-agrees' if agrees else ''}"
        if not (d / ".done").exists():
            print(f"building {d} ...", file=sys.stderr)
            ds3_checkpoint.build(str(d), "bench", seed=0, dtype="bf16", mtp_agrees=agrees)
            (d / ".done").write_text("ok")
        if not (d / "tokenizer.json").exists():
            ds3_checkpoint.write_tokenizer(str(d), 32768)
        out[name] = d
    return out


def text_prompts(prompt_len, n):
    """n prompts of BOS + prompt_len tokens, evenly spaced over the demo model's held-out text."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(DEMO / "tokenizer.json")).encode(
        (DEMO / "heldout.txt").read_text(), add_special_tokens=False).ids
    step = (len(ids) - prompt_len) // n
    return [[0] + ids[i * step:i * step + prompt_len] for i in range(n)]


def text_bench(addr, prompts, concurrency, requests, new_tokens, temperature):
    """Closed loop over `requests` prompts with `concurrency` threads; tokens/s and server draft counters."""
    from harness import model_info, pb, stub

    def req(i):
        return pb.GenerateRequest(input_ids=pb.TokenIds(ids=prompts[i % len(prompts)]),
                                  sampling=pb.SamplingParameters(temperature=temperature, seed=1000 + i),
                                  stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, ignore_eos=True))

    def drain(s, i):
        return sum(len(m.token_ids) for m in s.Generate(req(i), timeout=600))

    s0, ch0 = stub(addr)
    for i in range(min(concurrency, 4)):  # warm-up
        drain(s0, i)
    ch0.close()
    before = model_info(addr)
    nxt, tokens, lock = [0], [0], threading.Lock()

    def worker():
        s, ch = stub(addr)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= requests:
                break
            n = drain(s, i)
            with lock:
                tokens[0] += n
        ch.close()

    t0 = time.time()
    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    after = model_info(addr)
    return {"output_tokens_per_sec": tokens[0] / wall,
            "speculative_drafts": after.speculative_drafts - before.speculative_drafts,
            "speculative_accepted": after.speculative_accepted - before.speculative_accepted}


def interleaved(binary, model, modes, dtype, runs, rounds):
    """One server per mode, all up at once; each case runs on every mode in turn (A B C A B C ...), `rounds`
    times, so that a change in the machine's load falls on all modes alike. Returns results[mode][case] =
    the list of per-round results."""
    servers = []
    try:
        for extra in modes:
            servers.append(Serve(binary, model, 1, dtype, extra=extra))
            servers[-1].wait_ready()
        out = [[[] for _ in runs] for _ in modes]
        for _ in range(rounds):
            for c, r in enumerate(runs):
                for m, s in enumerate(servers):
                    out[m][c].append(r(s.addr))
        return out
    finally:
        for s in servers:
            s.stop()


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def summary(base, spec):
    """Median tokens/s of each mode, the per-round speedups, and the acceptance over all rounds."""
    tb = [b["output_tokens_per_sec"] for b in base]
    ts = [s["output_tokens_per_sec"] for s in spec]
    ratios = [s / b for s, b in zip(ts, tb)]
    drafts = sum(s["speculative_drafts"] for s in spec)
    return dict(base_tok_s=median(tb), spec_tok_s=median(ts), speedup=median(ratios), speedup_min=min(ratios),
                speedup_max=max(ratios), acceptance=sum(s["speculative_accepted"] for s in spec) / max(drafts, 1),
                drafts=drafts)


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "mlaserve"))
    ap.add_argument("--models", default="demo,random,agreeing-mtp")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per case; medians are reported")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    conc = [int(x) for x in a.concurrency.split(",")]
    rows = []
    load0 = os.getloadavg()
    for name, model in checkpoints(cache, a.models.split(",")).items():
        cases = []  # (label, temperature, concurrency, run(addr))
        for c in conc:
            n = a.requests_per_stream * c
            if name == "demo":
                prompts = text_prompts(a.prompt_len, 64)
                for temp in (0.0, 0.7):
                    cases.append((f"demo, text, T={temp:g}", temp, c, lambda addr, c=c, n=n, temp=temp, p=prompts:
                                  text_bench(addr, p, c, n, a.new_tokens, temp)))
            label = f"{name}, random ids" if name == "demo" else name
            cases.append((label, 0.0, c, lambda addr, c=c, n=n: bench(a.bin, addr, c, n, a.prompt_len,
                                                                       a.new_tokens)))
        runs = [r for *_, r in cases]
        modes = [[], ["--speculative", "mtp"]]
        # The router stops drafting for sequences below --speculative-min-acceptance; with the floor at
        # 0 every draft is verified, which is the MTP head's own acceptance rate.
        if name == "demo":
            modes.append(["--speculative", "mtp", "--speculative-min-acceptance", "0"])
        res = interleaved(a.bin, model, modes, a.dtype, runs, a.rounds)
        for i, (label, temp, c, _) in enumerate(cases):
            row = dict(model=label, temperature=temp, concurrency=c, rounds=a.rounds, **summary(res[0][i], res[1][i]))
            if len(modes) > 2:
                u = summary(res[0][i], res[2][i])
                row.update(ungated_tok_s=u["spec_tok_s"], ungated_speedup=u["speedup"],
                           ungated_acceptance=u["acceptance"], ungated_drafts=u["drafts"])
            rows.append(row)
    host = {"cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    print(f"\n{a.dtype}, {a.prompt_len}-token prompts, {a.new_tokens} new tokens, {a.requests_per_stream} "
          f"requests per stream, medians of {a.rounds} alternating rounds; {host['cpu']} x{host['cpus']}, load average {load0[0]:.2f} before, "
          f"{host['loadavg_after'][0]:.2f} after")
    print(f"{'model':<24} {'streams':>7} {'plain tok/s':>12} {'MTP tok/s':>10} {'speedup':>8} {'(min-max)':>11} "
          f"{'accepted':>9} {'drafts':>7}")
    for r in rows:
        print(f"{r['model']:<24} {r['concurrency']:>7} {r['base_tok_s']:>12.1f} {r['spec_tok_s']:>10.1f} "
              f"{r['speedup']:>8.2f} {r['speedup_min']:>5.2f}-{r['speedup_max']:<5.2f} {r['acceptance']:>9.1%} "
              f"{r['drafts']:>7}")
    gated = [r for r in rows if "ungated_tok_s" in r]
    if gated:
        print("\nwith --speculative-min-acceptance 0 (every draft verified):")
        print(f"{'model':<24} {'streams':>7} {'MTP tok/s':>10} {'speedup':>8} {'accepted':>9} {'drafts':>7}")
        for r in gated:
            print(f"{r['model']:<24} {r['concurrency']:>7} {r['ungated_tok_s']:>10.1f} {r['ungated_speedup']:>8.2f} "
                  f"{r['ungated_acceptance']:>9.1%} {r['ungated_drafts']:>7}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"host": host, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
