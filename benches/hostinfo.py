"""What the machine can do and what a decode step must read, for `vs_llamacpp.py`.

- `cpu()`: model name, core count and the SIMD flags that decide the kernels (AVX2, AVX-512F,
  AVX512_BF16, AMX, NEON), and the load average.
- `read_bandwidth(...)`: sustained read bandwidth from a small C loop compiled here with
  `-O3 -march=native -fopenmp` (a sum over a buffer far larger than the last-level cache, best of a
  few passes, the better of 4 KiB and 2 MiB pages), single-threaded and at the benchmark's thread
  count; torch's sum if no C compiler.
- `active_bytes(checkpoint)`: weight bytes a batch-1 decode step reads, per profiled section of
  mlaserve's forward pass (from the safetensors headers; routed experts counted k of n).
"""

import hashlib
import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

FLAGS = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512vbmi", "avx_vnni", "amx_tile", "amx_bf16",
         "amx_int8", "asimd", "sve", "bf16"]


def cpu(info=None):
    """Model (with family/model ids), CPU count, L3 size and the kernel-relevant flags; `info` is a
    /proc/cpuinfo text (default: this machine's)."""
    if info is None:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info, re.M)
    have = set(flags.group(1).split()) if flags else set()
    l3 = None
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (idx / "level").read_text().strip() == "3":
                l3 = (idx / "size").read_text().strip()
        except OSError:
            pass
    name = model.group(1).strip() if model else "unknown"
    # A VM's model name is often generic ("AMD EPYC"); family and model tell the generation
    # (x86: 25 = Zen 3/4, 26 = Zen 5; Arm: implementer and part).
    ids = [(k, re.search(rf"^{k}\s*:\s*(\S+)\s*$", info, re.M)) for k in
           ("cpu family", "model", "stepping", "CPU implementer", "CPU part")]
    ids = [f"{k} {m.group(1)}" for k, m in ids if m]
    if ids:
        name += f" ({', '.join(ids)})"
    return {"model": name, "cpus": os.cpu_count(), "l3": l3,
            "flags": [f for f in FLAGS if f in have]}


def load1():
    return os.getloadavg()[0]


def _busy_and_own():
    """(CPU-seconds all CPUs were busy or stolen, CPU-seconds of this process and its waited children)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(f[:8]) - f[3] - f[4]  # user nice system [idle iowait] irq softirq steal
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


class Foreign:
    """Share of the machine other processes used (or the hypervisor stole) while a run was timed: the
    load average cannot tell, since it counts the benchmark's own threads."""

    def __enter__(self):
        self.t0, (self.b0, self.o0) = time.monotonic(), _busy_and_own()
        return self

    def __exit__(self, *exc):
        b, o = _busy_and_own()
        self.share = max(0.0, (b - self.b0) - (o - self.o0)) / ((time.monotonic() - self.t0) * os.cpu_count())


_C = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
/* readbw BYTES REPS HUGE: HUGE 1 puts the buffer in 2 MiB pages where the kernel grants them */
int main(int argc, char **argv) {
    size_t n = (size_t)atoll(argv[1]) / sizeof(float) / 64 * 64;
    int reps = atoi(argv[2]), huge = argc > 3 && atoi(argv[3]);
    size_t page = huge ? (size_t)2 << 20 : 64, bytes = (n * sizeof(float) + page - 1) / page * page;
    float *a = aligned_alloc(page, bytes);
#ifdef MADV_HUGEPAGE
    if (huge) madvise(a, bytes, MADV_HUGEPAGE);
#endif
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;   /* first touch by the thread that reads it */
    double best = 1e30, total = 0, spent = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime(), s = 0;
        #pragma omp parallel reduction(+:s)
        {
            float acc[64] = {0};   /* 64 independent lanes: the loop is bound by memory, not adds */
            #pragma omp for schedule(static)
            for (size_t i = 0; i < n; i += 64)
                for (int j = 0; j < 64; j++) acc[j] += a[i + j];
            for (int j = 0; j < 64; j++) s += acc[j];
        }
        double dt = omp_get_wtime() - t0;
        if (dt < best) best = dt;
        spent += dt;
        total += s;
    }
    /* best pass, checksum, and the mean over all passes (what a run of the same length sustains) */
    printf("%.3f %.0f %.3f\n", n * sizeof(float) / best / 1e9, total / reps, n * sizeof(float) * reps / spent / 1e9);
    return 0;
}
"""


def _reader(cache: Path):
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256((_C + cc).encode() + Path("/proc/cpuinfo").read_bytes()[:4096]).hexdigest()[:12]
    exe = cache / "bench-tools" / f"readbw-{key}"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    src = exe.with_suffix(".c")
    src.write_text(_C)
    for march in (["-march=native"], []):
        r = subprocess.run([cc, "-O3", *march, "-fopenmp", "-o", str(exe), str(src)], capture_output=True)
        if r.returncode == 0:
            return exe
    return None


def _run_reader(exe: Path, threads: int, mib: int, reps: int, huge: bool = False):
    """(best pass, mean over all passes) in GB/s of the C reader over `mib` MiB on `threads` threads,
    the buffer in 2 MiB pages with `huge` (where the kernel grants them), else in ordinary ones."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="spread")
    args = [str(exe), str(mib << 20), str(reps), str(int(huge))]
    r = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    best, s, mean = r.stdout.split()
    assert float(s) == float((mib << 20) // 4 // 64 * 64), "read loop checksum"
    return float(best), float(mean)


def read_bandwidth(cache: Path, threads: int, mib: int = 1024, reps: int = 5):
    """{'threads N': GB/s} for 1 and `threads` threads, and the method used. With the C reader each is
    the better of a buffer in 4 KiB pages and one in 2 MiB pages (mlaserve holds its weights in huge
    pages where the kernel grants them, so the floor is what the machine reads that way too); both
    are kept under 'pages'."""
    out = {"buffer_mib": mib}
    exe = _reader(cache)
    for t in sorted({1, threads}):
        if exe:
            small, huge = (_run_reader(exe, t, mib, reps, huge=h)[0] for h in (False, True))
            out[t] = max(small, huge)
            out.setdefault("pages", {})[t] = {"4k": small, "2m": huge}
            out["method"] = "C sum loop (cc -O3 -march=native -fopenmp), best of %d, 4 KiB and 2 MiB pages" % reps
        else:
            import torch

            torch.set_num_threads(t)
            x = torch.ones(mib << 18)
            best = 1e30
            for _ in range(reps):
                t0 = time.perf_counter()
                x.sum().item()
                best = min(best, time.perf_counter() - t0)
            out[t] = x.numel() * 4 / best / 1e9
            out["method"] = "torch.sum over a float32 buffer, best of %d" % reps
    return out


def sustained_bandwidth(cache: Path, threads: int, mib: int = 1024, reps: int = 12):
    """GB/s over `reps` back-to-back passes of a `mib` buffer on `threads` threads: the mean, not the
    best pass. At 1 GiB x 12 the reading lasts about as long as a 64-token batch-1 decode, so a decode
    run right after it can be compared with what the machine sustained at that moment (on a VM the
    best 20 ms pass catches bursts no 0.3 s run keeps). The buffer is in 2 MiB pages where the kernel
    grants them (as `read_bandwidth`'s better case). None without a C compiler."""
    exe = _reader(cache)
    return _run_reader(exe, threads, mib, reps, huge=True)[1] if exe else None


_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _tensors(checkpoint: Path):
    for f in sorted(checkpoint.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                size = _SIZES[t["dtype"]]
                for d in t["shape"]:
                    size *= d
                yield name, t["shape"], size


def active_bytes(checkpoint: Path):
    """Bytes of weights one batch-1 decode token reads, keyed by mlaserve's profile sections.

    Sections nest as in the code: `attention` holds attn.proj / attn.core (core.absorb_q,
    core.absorb_out: the two halves of kv_b_proj) / attn.o_proj; `moe` holds moe.route,
    moe.experts (the routed experts) and moe.shared, or moe.experts_shared (both in one kernel call).
    The latent cache read (576 values per cached token) is not counted: at short context it is far
    below the weights."""
    c = json.loads((checkpoint / "config.json").read_text())
    n_layers, k, n = c["num_hidden_layers"], c["num_experts_per_tok"], c["n_routed_experts"]
    dn, dv = c["qk_nope_head_dim"], c["v_head_dim"]
    b = dict.fromkeys(["attn.proj", "kv_b", "attn.o_proj", "dense_mlp", "moe.route", "routed", "moe.shared",
                       "lm_head", "embed_row", "norms"], 0)
    for name, shape, size in _tensors(checkpoint):
        m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
        if not m:
            if name.startswith("lm_head."):
                b["lm_head"] += size
            elif "embed_tokens" in name:
                b["embed_row"] += size // shape[0]
            else:
                b["norms"] += size
            continue
        if int(m.group(1)) >= n_layers:  # the MTP module
            continue
        rest = m.group(2)
        if "layernorm" in rest and not rest.startswith("self_attn."):
            b["norms"] += size
        elif rest.startswith("self_attn.kv_b_proj"):
            b["kv_b"] += size
        elif rest.startswith("self_attn.o_proj"):
            b["attn.o_proj"] += size
        elif rest.startswith("self_attn."):
            b["attn.proj"] += size
        elif rest.startswith("mlp.experts."):
            b["routed"] += size
        elif rest.startswith("mlp.shared_experts."):
            b["moe.shared"] += size
        elif rest.startswith("mlp.gate."):
            b["moe.route"] += size
        else:
            b["dense_mlp"] += size
    routed = b["routed"] * k // n
    s = {
        "attn.proj": b["attn.proj"],
        "core.absorb_q": b["kv_b"] * dn // (dn + dv),
        "core.absorb_out": b["kv_b"] * dv // (dn + dv),
        "attn.core": b["kv_b"],
        "attn.o_proj": b["attn.o_proj"],
        "dense_mlp": b["dense_mlp"],
        "moe.route": b["moe.route"],
        "moe.experts": routed,
        "moe.shared": b["moe.shared"],
        # decode on the CPU: the routed and shared experts in one kernel call
        "moe.experts_shared": routed + b["moe.shared"],
        "lm_head": b["lm_head"],
    }
    s["attention"] = s["attn.proj"] + s["attn.core"] + s["attn.o_proj"]
    s["moe"] = s["moe.route"] + s["moe.experts"] + s["moe.shared"]
    s["total"] = s["attention"] + s["dense_mlp"] + s["moe"] + s["lm_head"] + b["embed_row"] + b["norms"]
    return s
