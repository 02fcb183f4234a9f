"""mlaserve next to llama.cpp on the same weights, on this machine: the project's CPU yardstick.

llama.cpp (ggml-org/llama.cpp@0c1e570, vendored by the PyPI sdist llama-cpp-python 0.3.36) is built
here with GGML_NATIVE and cached outside the checkout; the ~200M bf16 benchmark checkpoint (the one
decode_vs_transformers.py builds) is converted to GGUF bf16 with llama.cpp's own converter (MTP
layer dropped). Both engines then run alternately, A B A B, `--rounds` times, on one workload, with
the same thread count:

  figure                    mlaserve                                 llama.cpp
  decode batch 1 / 16 / 32  generate, 32-token prompts, N new tokens  llama-batched-bench -npp 32 -ntg N
  prefill 512 / 2048        serve + bench, one stream: time to first  llama-bench -p 512,2048
                            token (warm, prefix caching off)
  decode at 2048 context    generate, 2048-token prompt, N new        llama-batched-bench -npp 2048 -npl 1
  32 served streams         serve (router + 1 worker) + bench,         llama-batched-bench -npl 32,
                            32 concurrent requests                      prefill included

Every figure is tokens/s (decode: new tokens over decode time; prefill: prompt tokens over prefill
time, for mlaserve over time to first token; streams: output tokens over the whole run, prefill
included), reported as the best of the rounds (the median is printed too) and as the ratio
mlaserve / llama.cpp. Also printed: the CPU and its SIMD flags, measured read bandwidth, the
batch-1 bandwidth floor (active weight bytes per token / read bandwidth) with each engine's share
of it, mlaserve's MLASERVE_PROFILE breakdown of a batch-1 decode step with GB/s per section, the
share of the CPUs other processes took during the timed runs, and transformers batch-1 as a
secondary reference.

  python benches/vs_llamacpp.py [--bin target/release/mlaserve] [--threads 2] [--quick] [--json OUT]
  make bench-cpu
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests" / "reference"))

import hostinfo  # noqa: E402
import llamacpp  # noqa: E402
from decode_vs_transformers import bench_checkpoint, prompts  # noqa: E402
from serving_vs_transformers import Serve  # noqa: E402

# (key, label) in the order of the table; keys are the figures of both engines.
FIGURES = [
    ("decode_b1", "decode, batch 1"),
    ("decode_b16", "decode, batch 16 (aggregate)"),
    ("decode_b32", "decode, batch 32 (aggregate)"),
    ("prefill_512", "prefill, 512-token prompt"),
    ("prefill_2048", "prefill, 2048-token prompt"),
    ("decode_ctx2048", "decode, batch 1 at 2048 context"),
    ("streams_32", "32 streams, prefill included"),
]


def log(msg):
    print(f"[vs_llamacpp] {msg}", file=sys.stderr, flush=True)


class Mlaserve:
    """mlaserve's side: `generate --json --stats` for decode/prefill, `serve` + `bench` for streams."""

    def __init__(self, binary, model, threads, dtype, kernel=None):
        self.binary, self.model, self.dtype = binary, model, dtype
        self.env = dict(os.environ, MLASERVE_THREADS=str(threads))
        if kernel:
            self.env["MLASERVE_KERNEL"] = kernel
        self.vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        self.kernel_lines = set()

    def generate(self, batch, prompt_len, new_tokens, profile=False, seed=0):
        args = [self.binary, "generate", "--model", str(self.model), "--max-new-tokens", str(new_tokens),
                "--dtype", self.dtype, "--json", "--stats"]
        for p in prompts(batch, prompt_len, self.vocab, seed=seed):
            args += ["--ids", ",".join(map(str, p))]
        env = dict(self.env, MLASERVE_PROFILE="1") if profile else self.env
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            raise RuntimeError("mlaserve generate failed")
        lines = r.stderr.strip().splitlines()
        for ln in lines:
            # The load log's `kernel="avx512bf16"` (ANSI colours stripped).
            m = re.search(r'\bkernel="?([a-z0-9_]+)', re.sub(r"\x1b\[[0-9;]*m", "", ln))
            if m:
                self.kernel_lines.add(m.group(1))
        stats = json.loads(lines[-1])
        stats["profile"] = parse_profile(lines) if profile else None
        return stats

    def decode_group(self, new_tokens):
        out = {}
        for b in (1, 16, 32):
            s = self.generate(b, 32, new_tokens)
            out[f"decode_b{b}"] = s["decode_tokens_per_sec"]
        return out

    def long_group(self, new_tokens):
        """Prefill as time to first token of one stream on a warm `serve` (prefix caching off): every
        512-token chunk counted. (`generate --stats` counts only the chunk that samples, so its
        prefill_secs covers 1 of the 4 chunks of a 2048-token prompt.) Decode at 2048 tokens of
        context from `generate`, whose decode figures are complete."""
        out = {}
        s = Serve(self.binary, self.model, 1, self.dtype, extra=("--prefix-caching", "false"))
        try:
            s.wait_ready()
            for n, reqs in ((512, 4), (2048, 2)):
                r = self.bench(s.addr, concurrency=1, requests=reqs, warmup=1, prompt_len=n, output_len=1)
                out[f"prefill_{n}"] = n / r["ttft_secs"]["p50"]
        finally:
            s.stop()
        out["decode_ctx2048"] = self.generate(1, 2048, new_tokens)["decode_tokens_per_sec"]
        return out

    def bench(self, addr, **kw):
        args = [self.binary, "bench", "--target", addr, "--json"]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        r = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
        if r.get("errors"):
            raise RuntimeError(f"mlaserve bench errors: {r['errors']}")
        return r

    def streams_group(self, new_tokens, requests):
        s = Serve(self.binary, self.model, 1, self.dtype)
        try:
            s.wait_ready()
            r = self.bench(s.addr, concurrency=32, requests=requests, warmup=8, prompt_len=32, output_len=new_tokens)
        finally:
            s.stop()
        return {"streams_32": r["output_tokens_per_sec"], "streams_32_tpot_ms": r["tpot_secs"]["mean"] * 1e3}


class LlamaCpp:
    def __init__(self, bindir, gguf, threads):
        self.bindir, self.gguf, self.threads = bindir, gguf, threads
        self.flash_attn = None

    def decode_group(self, new_tokens):
        rows = llamacpp.batched_bench(self.bindir, self.gguf, self.threads, 32, new_tokens, (1, 16, 32))
        self.flash_attn = rows[1]["flash_attn"]
        return {f"decode_b{b}": rows[b]["speed_tg"] for b in (1, 16, 32)}

    def long_group(self, new_tokens):
        pp = llamacpp.bench(self.bindir, self.gguf, self.threads, prompts=(512, 2048))
        rows = llamacpp.batched_bench(self.bindir, self.gguf, self.threads, 2048, new_tokens, (1,))
        return {"prefill_512": pp["pp512"], "prefill_2048": pp["pp2048"], "decode_ctx2048": rows[1]["speed_tg"]}

    def streams_group(self, new_tokens, requests):
        rows = llamacpp.batched_bench(self.bindir, self.gguf, self.threads, 32, new_tokens, (32,))
        return {"streams_32": rows[32]["output_tok_s"]}


# mlaserve's profile sections in forward order; the nested ones are indented in the report.
SECTIONS = ["plan", "attention", "attn.proj", "attn.core", "core.absorb_q", "core.gather", "core.scores",
            "core.absorb_out", "attn.o_proj", "dense_mlp", "moe", "moe.route", "moe.experts", "moe.shared",
            "moe.experts_shared", "lm_head", "sample"]
TOP_LEVEL = {"plan", "attention", "dense_mlp", "moe", "lm_head", "sample"}


def parse_profile(lines):
    """MLASERVE_PROFILE's table: {section: (total ms, calls)}."""
    out = {}
    for ln in lines:
        m = re.match(r"^([a-z_.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", ln.strip())
        if m:
            out[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    return out


def decode_profile(ours, new_tokens, active, bw):
    """Per-section time of one batch-1 decode step: a run with `new_tokens` minus a run with one (the
    prefill), over the decode steps between them; GB/s = active weight bytes / that time."""
    short = ours.generate(1, 32, 1, profile=True)
    full = ours.generate(1, 32, new_tokens + 1, profile=True)
    steps = full["decode_steps"] - short["decode_steps"]
    step_ms = (full["decode_secs"] - short["decode_secs"]) * 1e3 / steps
    rows = []
    names = sorted((n for n in full["profile"] if n != "replay"),
                   key=lambda n: (SECTIONS.index(n) if n in SECTIONS else 99, n))
    for name in names:
        ms, calls = full["profile"][name]
        ms0, calls0 = short["profile"].get(name, (0.0, 0))
        per_step = (ms - ms0) / steps
        nbytes = active.get(name)
        gbs = nbytes / (per_step * 1e-3) / 1e9 if nbytes and per_step > 0 else None
        rows.append({"section": name, "ms_per_step": per_step, "calls_per_step": (calls - calls0) / steps,
                     "active_mb": nbytes / 1e6 if nbytes else None, "gb_s": gbs,
                     "share_of_read_bw": gbs / bw if gbs else None,
                     # time above what reading the section's weights at the measured bandwidth takes
                     "gap_ms": per_step - (nbytes or 0) / (bw * 1e9) * 1e3})
    top = sum(r["ms_per_step"] for r in rows if r["section"] in TOP_LEVEL)
    rows.append({"section": "other (unprofiled)", "ms_per_step": step_ms - top, "active_mb": None, "gb_s": None,
                 "share_of_read_bw": None, "gap_ms": step_ms - top})
    total = active["total"] / (bw * 1e9) * 1e3
    # The same bytes read again in-process after each decode step (MLASERVE_PROFILE's `replay`).
    ms, calls = full["profile"].get("replay", (0.0, 0))
    replay_ms = ms / calls if calls else None
    return {"step_ms": step_ms, "steps": steps, "floor_step_ms": total, "sections": rows,
            "replay_ms": replay_ms, "replay_gb_s": active["total"] / (replay_ms * 1e-3) / 1e9 if replay_ms else None,
            "share_of_replay": replay_ms / step_ms if replay_ms else None}


def summarise(samples):
    """Best (highest tok/s, lowest ms), median and every sample of each figure over the rounds."""
    out = {}
    for k in sorted({k for s in samples for k in s}):
        v = [s[k] for s in samples if k in s]
        out[k] = {"best": min(v) if k.endswith("_ms") else max(v), "median": statistics.median(v), "samples": v}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("MLASERVE_BIN", str(ROOT / "target" / "release" / "mlaserve")))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="for both engines (default: all CPUs)")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds per figure (at least 2; best is reported)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=96, help="requests of the 32-stream run (32 concurrent)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kernel", help="MLASERVE_KERNEL for mlaserve's runs (forces a kernel path)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers batch-1 row")
    ap.add_argument("--quick", action="store_true", help="shorter run: 32 new tokens, 32 requests, small buffer")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="write every figure to OUT")
    a = ap.parse_args()
    if a.quick:
        a.new_tokens, a.requests = min(a.new_tokens, 32), min(a.requests, 32)
    cache = Path(os.environ.get("MLASERVE_CACHE", Path.home() / ".cache" / "mlaserve"))
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load1_start": hostinfo.load1(), "cpu": hostinfo.cpu(),
           "threads": a.threads, "rounds": a.rounds, "new_tokens": a.new_tokens, "requests": a.requests,
           "dtype": a.dtype, "quick": a.quick, "llama_cpp": f"{llamacpp.LLAMA_COMMIT} (llama-cpp-python "
           f"{llamacpp.VERSION})"}
    c = res["cpu"]
    print(f"CPU: {c['model']}, {c['cpus']} CPUs, L3 {c['l3']}, flags: {' '.join(c['flags']) or 'none of ours'}")
    print(f"load average (1 min) at start: {res['load1_start']:.2f}", flush=True)

    model = bench_checkpoint(cache)
    bindir = llamacpp.build(cache, jobs=os.cpu_count())
    gguf = llamacpp.convert(cache, model, sys.executable)
    if not Path(a.bin).exists():
        sys.exit(f"no mlaserve binary at {a.bin} (make build)")
    os.environ["MLASERVE_THREADS"] = str(a.threads)  # `serve` passes it to its worker
    if a.kernel:
        os.environ["MLASERVE_KERNEL"] = a.kernel
    ours = Mlaserve(a.bin, model, a.threads, a.dtype, a.kernel)
    theirs = LlamaCpp(bindir, gguf, a.threads)

    mib = 256 if a.quick else max(1024, 32 * _l3_mib(c["l3"]))
    bw = hostinfo.read_bandwidth(cache, a.threads, mib=mib, reps=3 if a.quick else 10)
    res["read_bandwidth_gb_s"] = bw
    print(f"read bandwidth: {bw[1]:.1f} GB/s on 1 thread, {bw[a.threads]:.1f} GB/s on {a.threads} "
          f"({bw['method']}, {mib} MiB buffer{_pages(bw, a.threads)})", flush=True)

    samples, foreign = {"mlaserve": [], "llama.cpp": []}, []
    # Each engine's decode group (batch 1 first) right after a sustained read of the same length.
    moment_bw = {"mlaserve": [], "llama.cpp": []}
    for r in range(a.rounds):
        got = {"mlaserve": {}, "llama.cpp": {}}
        for group in ("decode_group", "long_group", "streams_group"):
            for name, eng in (("mlaserve", ours), ("llama.cpp", theirs)):
                if group == "decode_group":
                    moment_bw[name].append(hostinfo.sustained_bandwidth(cache, a.threads, mib=mib))
                t0 = time.perf_counter()
                args = (a.new_tokens, a.requests) if group == "streams_group" else (a.new_tokens,)
                with hostinfo.Foreign() as other:
                    got[name].update(getattr(eng, group)(*args))
                foreign.append(other.share)
                log(f"round {r + 1}/{a.rounds} {group} {name}: {time.perf_counter() - t0:.0f} s, other processes "
                    f"{other.share:.0%} of the CPUs, load {hostinfo.load1():.2f}")
        for name in samples:
            samples[name].append(got[name])
    res["foreign_cpu_share_each_run"] = foreign
    summ = {name: summarise(s) for name, s in samples.items()}
    res["figures"] = summ
    res["ratios"] = {k: summ["mlaserve"][k]["best"] / summ["llama.cpp"][k]["best"] for k, _ in FIGURES}
    res["ratios_median"] = {k: summ["mlaserve"][k]["median"] / summ["llama.cpp"][k]["median"] for k, _ in FIGURES}

    # Measured again at the end: on a VM the figure can move with where the vCPUs are placed.
    bw_end = hostinfo.read_bandwidth(cache, a.threads, mib=mib, reps=3 if a.quick else 10)
    res["read_bandwidth_end_gb_s"] = bw_end
    print(f"read bandwidth at the end: {bw_end[1]:.1f} GB/s on 1 thread, {bw_end[a.threads]:.1f} GB/s on "
          f"{a.threads}{_pages(bw_end, a.threads)}; the floor uses the higher of the two", flush=True)
    bw = {t: max(bw[t], bw_end[t]) if isinstance(bw[t], float) else bw[t] for t in bw}
    res["read_bandwidth_best_gb_s"] = bw
    active = hostinfo.active_bytes(model)
    res["active_bytes_per_token_b1"] = active
    floor = bw[a.threads] * 1e9 / active["total"]
    res["floor_tok_s_b1"] = floor
    res["share_of_floor_b1"] = {n: summ[n]["decode_b1"]["best"] / floor for n in summ}
    # The same share per round against the sustained read just before that round's batch-1 run.
    res["sustained_bandwidth_before_b1_gb_s"] = moment_bw
    res["share_of_moment_floor_b1"] = {
        n: [tok * active["total"] / (gbs * 1e9) for tok, gbs in zip(summ[n]["decode_b1"]["samples"], moment_bw[n])
            if gbs] for n in summ}
    res["profile_b1"] = decode_profile(ours, a.new_tokens, active, bw[a.threads])
    res["mlaserve_kernel"] = sorted(ours.kernel_lines) or None
    res["llama_cpp_isa"] = llamacpp.native_isa()
    res["llama_cpp_flash_attn"] = theirs.flash_attn
    if not a.no_transformers and not a.quick:
        res["transformers_b1"] = transformers_b1(model, a.new_tokens, a.dtype, a.threads)
    res["load1_end"] = hostinfo.load1()
    report(res, FIGURES)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))


def _pages(bw, threads):
    """', on N threads 4 KiB pages X, 2 MiB pages Y GB/s' where the C reader measured both."""
    p = bw.get("pages", {}).get(threads)
    return f"; on {threads}: 4 KiB pages {p['4k']:.1f}, 2 MiB pages {p['2m']:.1f}" if p else ""


def _l3_mib(l3):
    m = re.match(r"(\d+)\s*([KMG]?)", l3 or "")
    if not m:
        return 32
    return max(1, int(m.group(1)) * {"K": 1, "M": 1024, "G": 1 << 20, "": 1}[m.group(2)] // 1024)


def transformers_b1(model, new_tokens, dtype, threads):
    """The secondary reference: Hugging Face transformers generate at batch 1 (decode tok/s)."""
    import torch
    from decode_vs_transformers import theirs as hf

    torch.set_num_threads(threads)
    t = hf(model, prompts(1, 32, json.loads((model / "config.json").read_text())["vocab_size"]), new_tokens, dtype)
    return {"decode_b1": (new_tokens - 1) / t["decode_secs"], "total_b1": new_tokens / t["total_secs"]}


def report(res, figures):
    f, r = res["figures"], res["ratios"]
    n = res["rounds"]
    print(f"\n{res['dtype']}, {res['threads']} threads for both, {res['new_tokens']} new tokens, best of {n} "
          f"alternating rounds (median ratio in brackets); llama.cpp {res['llama_cpp']}")
    print(f"{'figure':<34} {'mlaserve tok/s':>15} {'llama.cpp tok/s':>16} {'ratio':>7} {'(median)':>9}")
    for k, label in figures:
        print(f"{label:<34} {f['mlaserve'][k]['best']:>15.1f} {f['llama.cpp'][k]['best']:>16.1f} "
              f"{r[k]:>6.2f}x {res['ratios_median'][k]:>8.2f}x")
    act, bw = res["active_bytes_per_token_b1"], res["read_bandwidth_best_gb_s"][res["threads"]]
    print(f"\nbatch-1 floor: {act['total'] / 1e6:.1f} MB of active weights per token / {bw:.1f} GB/s = "
          f"{res['floor_tok_s_b1']:.1f} tok/s; mlaserve reaches {res['share_of_floor_b1']['mlaserve']:.0%}, "
          f"llama.cpp {res['share_of_floor_b1']['llama.cpp']:.0%}")
    m = res["share_of_moment_floor_b1"]
    if all(m.values()):
        bws = res["sustained_bandwidth_before_b1_gb_s"]
        print("  each round against the sustained read just before its batch-1 run (GB/s: "
              + "; ".join(f"{n} {', '.join(f'{g:.1f}' for g in bws[n])}" for n in bws) + "): "
              + "; ".join(f"{n} {', '.join(f'{v:.0%}' for v in m[n])} (median {statistics.median(m[n]):.0%})"
                          for n in m))
    p = res["profile_b1"]
    print(f"\nmlaserve batch-1 decode step, MLASERVE_PROFILE=1 ({p['step_ms']:.2f} ms per step over {p['steps']} "
          f"steps; nested sections indented; GB/s = active weight bytes / time):")
    print(f"  {'section':<22} {'ms/step':>8} {'active MB':>10} {'GB/s':>7} {'of read bw':>11} {'gap ms':>7}")
    for s in p["sections"]:
        name = s["section"]
        indent = "    " if name.startswith("core.") else "  " if name not in TOP_LEVEL and "(" not in name else ""
        mb = f"{s['active_mb']:.1f}" if s["active_mb"] else "-"
        gbs = f"{s['gb_s']:.1f}" if s["gb_s"] else "-"
        share = f"{s['share_of_read_bw']:.0%}" if s["share_of_read_bw"] else "-"
        print(f"  {indent + name:<22} {s['ms_per_step']:>8.3f} {mb:>10} {gbs:>7} {share:>11} {s['gap_ms']:>7.3f}")
    print(f"  {'step':<22} {p['step_ms']:>8.3f} {act['total'] / 1e6:>10.1f} "
          f"{act['total'] / p['step_ms'] / 1e6:>7.1f} {act['total'] / p['step_ms'] / 1e6 / bw:>11.0%} "
          f"{p['step_ms'] - p['floor_step_ms']:>7.3f}")
    if p.get("replay_ms"):
        print(f"  the same {act['total'] / 1e6:.1f} MB read again after each step, in-process, on the same pool "
              f"(`replay`): {p['replay_ms']:.3f} ms ({p['replay_gb_s']:.1f} GB/s); the step is at "
              f"{p['share_of_replay']:.0%} of this floor")
    leaves = [s for s in p["sections"] if s["section"] not in ("attention", "moe", "attn.core")]
    worst = sorted(leaves, key=lambda s: -s["gap_ms"])[:4]
    print("  biggest gaps to the bandwidth floor: " + ", ".join(f"{s['section']} {s['gap_ms']:.2f} ms" for s in worst))
    print(f"\nmlaserve kernel path: {res['mlaserve_kernel'] or 'not reported by this build'}")
    print(f"llama.cpp: ggml CPU backend built GGML_NATIVE for {' '.join(res['llama_cpp_isa'])}; flash_attn "
          f"{ {-1: 'auto', 0: 'off', 1: 'on'}.get(res['llama_cpp_flash_attn'], res['llama_cpp_flash_attn'])}")
    if "transformers_b1" in res:
        t = res["transformers_b1"]["decode_b1"]
        print(f"transformers batch-1 decode (secondary reference): {t:.1f} tok/s; mlaserve / transformers "
              f"{f['mlaserve']['decode_b1']['best'] / t:.2f}x, llama.cpp / transformers "
              f"{f['llama.cpp']['decode_b1']['best'] / t:.2f}x")
    fs = res["foreign_cpu_share_each_run"]
    print(f"load average (1 min): {res['load1_start']:.2f} at start, {res['load1_end']:.2f} at end (both include "
          f"this benchmark's own threads); other processes used {statistics.mean(fs):.0%} of the CPUs on average "
          f"during the timed runs, {max(fs):.0%} at most" + (" -- figures distorted" if max(fs) > 0.1 else ""))


if __name__ == "__main__":
    main()
