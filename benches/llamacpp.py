"""llama.cpp for the side-by-side benchmark (`vs_llamacpp.py`): built from a registry package, cached.

- `build(cache)`: the PyPI sdist `llama-cpp-python==VERSION` vendors ggml-org/llama.cpp under
  `vendor/llama.cpp`; it is downloaded with pip into a bench-tools venv (cmake, ninja and
  scikit-build-core as PyPI wheels; never the project venv), built with GGML_NATIVE for this CPU,
  and kept in `CACHE/llamacpp/VERSION-<cpu key>/` so a warm machine reuses it.
- `convert(...)`: the benchmark checkpoint to GGUF bf16 with llama.cpp's own `convert_hf_to_gguf.py`
  (MTP layer dropped, the project's BPE pre-tokenizer mapped to `deepseek-v3`).
- `bench(...)`, `batched_bench(...)`: llama-bench / llama-batched-bench figures as dicts.

Nothing here is committed to the checkout: sources, build and GGUF all live in the cache.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # vendors ggml-org/llama.cpp@0c1e570
LLAMA_COMMIT = "0c1e570"
TOOLS = ["cmake==4.4.5", "ninja==1.13.2", "scikit-build-core==1.1.2"]
TARGETS = ["llama-bench", "llama-batched-bench", "llama-server", "llama-quantize"]
CMAKE_FLAGS = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"]


def log(msg):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def cpu_key():
    """GGML_NATIVE builds for this CPU: key the build on the model name and flags."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


def root(cache: Path) -> Path:
    return cache / "llamacpp" / f"{VERSION}-{cpu_key()}"


def tools_venv(cache: Path) -> Path:
    """A venv of its own for cmake / ninja / scikit-build-core (PyPI wheels), keyed on the pins."""
    key = hashlib.sha256(" ".join(TOOLS).encode()).hexdigest()[:10]
    venv = cache / "llamacpp" / f"tools-{key}"
    if not (venv / ".installed").exists():
        log(f"bench tools venv {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *TOOLS], check=True)
        (venv / ".installed").write_text("ok")
    return venv


def source(cache: Path) -> Path:
    """vendor/llama.cpp of the sdist, extracted once (shared by every CPU's build)."""
    src = cache / "llamacpp" / f"src-{VERSION}"
    if (src / ".done").exists():
        return src
    venv = tools_venv(cache)
    dl = cache / "llamacpp" / "downloads"
    sdist = dl / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        log(f"pip download llama-cpp-python=={VERSION} (sdist)")
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-deps", "--no-build-isolation", "--no-binary", ":all:", "-d", str(dl),
                        f"llama-cpp-python=={VERSION}"], check=True, env=dict(os.environ, PATH=_path(venv)))
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = src.with_name(src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            # (the sdist's vendor/llama.cpp/.git is a submodule link to a repository it does not ship)
            if m.name.startswith(prefix) and len(m.name) > len(prefix) and m.name != prefix + ".git":
                m.name = m.name[len(prefix):]
                members.append(m)
        tf.extractall(tmp, members=members, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    (src / ".done").write_text(VERSION)
    return src


def _path(venv: Path) -> str:
    return f"{venv / 'bin'}:{os.environ.get('PATH', '')}"


def build(cache: Path, jobs: int = 2) -> Path:
    """The directory of the built binaries (llama-bench, llama-batched-bench, ...)."""
    out = root(cache)
    bindir = out / "build" / "bin"
    if (out / ".built").exists() and all((bindir / t).exists() for t in TARGETS):
        return bindir
    src = source(cache)
    venv = tools_venv(cache)
    env = dict(os.environ, PATH=_path(venv))
    log(f"building llama.cpp {LLAMA_COMMIT} (llama-cpp-python {VERSION}) in {out / 'build'}, nice 19, -j{jobs}")
    subprocess.run(["nice", "-n", "19", str(venv / "bin" / "cmake"), "-S", str(src), "-B", str(out / "build"),
                    "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={venv / 'bin' / 'ninja'}", *CMAKE_FLAGS],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["nice", "-n", "19", str(venv / "bin" / "cmake"), "--build", str(out / "build"), "-j", str(jobs),
                    "--target", *TARGETS], check=True, env=env, stdout=subprocess.DEVNULL)
    (out / ".built").write_text(json.dumps({"version": VERSION, "commit": LLAMA_COMMIT, "flags": CMAKE_FLAGS}))
    return bindir


# Run by the project venv's python (torch, transformers, safetensors, numpy) with gguf-py on the path:
# llama.cpp's own converter, with three in-memory adjustments for the project's random checkpoint.
_CONVERT = r"""
import importlib.machinery, re, sys, types
try:
    import gguf  # noqa: F401
except ModuleNotFoundError as e:  # some gguf-py versions import sentencepiece, which BPE never uses
    if e.name != "sentencepiece":
        raise
    stub = types.ModuleType("sentencepiece")
    stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
    stub.SentencePieceProcessor = None
    sys.modules["sentencepiece"] = stub
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
import convert_hf_to_gguf as conv
from conversion.base import TextModel
from conversion.deepseek import DeepseekV2Model

orig_pre = TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig_pre(self, tokenizer)
    except NotImplementedError:  # the project trains its own BPE: unknown hash; same byte-level family
        print("[convert] unknown BPE pre-tokenizer hash: using deepseek-v3", file=sys.stderr)
        return "deepseek-v3"
TextModel.get_vocab_base_pre = pre

orig_filter = DeepseekV2Model.filter_tensors.__func__
def drop_mtp(cls, item):
    m = re.match(r"model\.layers\.(\d+)\.", item[0])
    if m and int(m.group(1)) >= N_LAYERS:  # the MTP module is stored as layer num_hidden_layers
        return None
    return orig_filter(cls, item)
DeepseekV2Model.filter_tensors = classmethod(drop_mtp)
conv.main()
"""


def convert(cache: Path, checkpoint: Path, python: str) -> Path:
    """The checkpoint as GGUF bf16 (cached per checkpoint content): MTP layer dropped, pre-tokenizer
    mapped to deepseek-v3. `python` needs torch, transformers, safetensors and numpy."""
    src = source(cache)
    cfg = json.loads((checkpoint / "config.json").read_text())
    h = hashlib.sha256((checkpoint / "config.json").read_bytes())
    for f in sorted(checkpoint.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out_dir = cache / "llamacpp" / "gguf" / f"{checkpoint.name}-{h.hexdigest()[:12]}"
    gguf_path = out_dir / "model-bf16.gguf"
    if gguf_path.exists():
        return gguf_path
    # A view of the checkpoint with num_nextn_predict_layers 0: links to its files, a new config.json.
    stage = out_dir / "hf"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("."):
            (stage / f.name).symlink_to(f.resolve())
    cfg["num_nextn_predict_layers"] = 0
    (stage / "config.json").write_text(json.dumps(cfg, indent=2))
    prog = _CONVERT.replace("N_LAYERS", str(int(cfg["num_hidden_layers"])))
    env = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}:{src}", NO_LOCAL_GGUF="1")
    tmp = out_dir / "model-bf16.gguf.tmp"
    log(f"converting {checkpoint} to GGUF bf16 with convert_hf_to_gguf.py")
    r = subprocess.run([python, "-c", prog, str(stage), "--outtype", "bf16", "--outfile", str(tmp)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise RuntimeError("convert_hf_to_gguf.py failed")
    tmp.rename(gguf_path)
    return gguf_path


def _run(args):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
        raise RuntimeError(f"{Path(str(args[0])).name} failed ({r.returncode})")
    return r


def native_isa():
    """The instruction-set extensions GGML_NATIVE compiles ggml's CPU kernels for (`-march=native` as
    the C compiler sees this CPU); the benchmark tools do not print ggml's own feature line."""
    r = subprocess.run([os.environ.get("CC", "cc"), "-march=native", "-dM", "-E", "-"], input="",
                       capture_output=True, text=True)
    want = ["AVX2", "FMA", "F16C", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512BF16", "AVXVNNI", "AMX_TILE",
            "AMX_BF16", "AMX_INT8", "ARM_NEON", "ARM_FEATURE_SVE", "ARM_FEATURE_BF16"]
    have = set(re.findall(r"#define __(\w+)__ 1", r.stdout))
    return [w for w in want if w in have]


def bench(bindir: Path, gguf: Path, threads: int, prompts=(512, 2048), gen=0, reps=1):
    """llama-bench: {'pp512': tok/s, ...} (mean of `reps` runs after its own warm-up run)."""
    args = [bindir / "llama-bench", "-m", gguf, "-t", threads, "-r", reps, "-o", "json",
            "-p", ",".join(map(str, prompts)) if prompts else "0", "-n", gen]
    r = _run(args)
    out = {}
    for row in json.loads(r.stdout):
        key = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        out[key] = row["avg_ts"]
        out["flash_attn"] = row.get("flash_attn")
        out["cpu_info"] = row.get("cpu_info")
    return out


def batched_bench(bindir: Path, gguf: Path, threads: int, pp: int, tg: int, pls):
    """llama-batched-bench: one dict per batch size `pl` (random tokens, separate prompts per sequence),
    with decode tok/s (speed_tg), prefill tok/s and output tokens over prefill + decode time."""
    ctx = max(pls) * (pp + tg)
    ctx = (ctx + 255) // 256 * 256
    args = [bindir / "llama-batched-bench", "-m", gguf, "-t", threads, "-tb", threads, "-c", ctx, "-b", 2048,
            "-ub", 512, "-npp", pp, "-ntg", tg, "-npl", ",".join(map(str, pls)), "--output-format", "jsonl"]
    r = _run(args)
    rows = {}
    for line in (r.stdout + "\n" + r.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            row["output_tok_s"] = row["pl"] * row["tg"] / row["t"]
            rows[row["pl"]] = row
    return rows


def quantize(bindir: Path, gguf: Path, kind: str = "q8_0") -> Path:
    """`llama-quantize` of a GGUF (cached beside it)."""
    out = gguf.with_name(f"model-{kind}.gguf")
    if not out.exists():
        log(f"llama-quantize {gguf.name} -> {out.name}")
        tmp = out.with_suffix(".tmp")
        _run([bindir / "llama-quantize", gguf, tmp, kind])
        tmp.rename(out)
    return out
