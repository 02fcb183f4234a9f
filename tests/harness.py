"""Real processes on loopback and an independent Python gRPC client (grpcio, stubs generated from the
project's .proto files at test time)."""

import contextlib
import hashlib
import importlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from conftest import BIN, CACHE, ROOT

PROTO_DIR = ROOT / "proto"
PROTOS = ["mlaserve/v1/generation.proto", "mlaserve/internal/v1/stage.proto"]
TEST_PROTO_DIR = ROOT / "tests" / "protos"
TEST_PROTOS = ["health_check/health.proto"]  # package grpc.health.v1; module path avoids grpcio's `grpc`


def _stubs_dir() -> Path:
    h = hashlib.sha256()
    for p in PROTOS:
        h.update((PROTO_DIR / p).read_bytes())
    for p in TEST_PROTOS:
        h.update((TEST_PROTO_DIR / p).read_bytes())
    out = CACHE / "pystubs" / h.hexdigest()[:12]
    if not (out / ".done").exists():
        out.mkdir(parents=True, exist_ok=True)
        from grpc_tools import protoc

        for inc, files in ((PROTO_DIR, PROTOS), (TEST_PROTO_DIR, TEST_PROTOS)):
            args = ["protoc", f"-I{inc}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
            if protoc.main(args) != 0:
                raise RuntimeError("grpc_tools.protoc failed")
        (out / ".done").write_text("ok")
    return out


sys.path.insert(0, str(_stubs_dir()))
pb = importlib.import_module("mlaserve.v1.generation_pb2")
pb_grpc = importlib.import_module("mlaserve.v1.generation_pb2_grpc")
stage_pb = importlib.import_module("mlaserve.internal.v1.stage_pb2")
stage_grpc = importlib.import_module("mlaserve.internal.v1.stage_pb2_grpc")
health_pb = importlib.import_module("health_check.health_pb2")
health_grpc = importlib.import_module("health_check.health_pb2_grpc")


class Proc:
    """A mlaserve process that prints `MLASERVE_LISTENING <role> <addr>` once it listens."""

    def __init__(self, args, env=None, role=None, timeout=120, bin=None):
        e = dict(os.environ)
        e.setdefault("RUST_LOG", "warn,mlaserve=info")
        e.update(env or {})
        self.args = [str(bin or BIN), *map(str, args)]
        self.p = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        self.stderr_lines = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.addr = None
        self.metrics_addr = None
        self.http_addr = None
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(self.args)} exited early:\n{self.stderr()}")
            parts = line.split()
            if line.startswith("MLASERVE_METRICS"):
                self.metrics_addr = parts[1]
            if line.startswith("MLASERVE_LISTENING http"):
                self.http_addr = parts[2]
            if line.startswith("MLASERVE_LISTENING"):
                if role is None or parts[1] == role:
                    self.addr = parts[2]
                    break
        if self.addr is None:
            raise RuntimeError(f"{' '.join(self.args)} did not start listening")
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _drain_stdout(self):
        for _ in self.p.stdout:
            pass

    def _drain_stderr(self):
        for line in self.p.stderr:
            self.stderr_lines.append(line)

    def stderr(self):
        return "".join(self.stderr_lines[-200:])

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)

    def stop(self, timeout=10):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def start_worker(model, layers, shards=1, dtype="f32", kv_blocks=256, block_size=16, threads=1, extra=(),
                 wait=True, bin=None, token=None):
    w = Proc(["worker", "--model", model, "--layers", f"{layers[0]}..{layers[1]}", "--listen", "127.0.0.1:0",
              "--expert-shards", shards, "--dtype", dtype, "--kv-blocks", kv_blocks, "--block-size", block_size,
              *extra], env={"MLASERVE_THREADS": str(threads)}, role="worker", bin=bin)
    if wait:
        wait_stage_ready(w, token=token)
    return w


def wait_stage_ready(w, timeout=120, token=None):
    """Polls Info until the stage has loaded its layers (presenting the stage token, if any)."""
    ch = grpc.insecure_channel(w.addr)
    st = stage_grpc.StageStub(ch)
    md = [("authorization", f"Bearer {token}")] if token else None
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                return st.Info(stage_pb.InfoRequest(), timeout=5, metadata=md)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or w.p.poll() is not None:
                    raise RuntimeError(f"worker failed: {e.details()}\n{w.stderr()}")
                time.sleep(0.05)
        raise TimeoutError(f"worker {w.addr} did not load in {timeout}s")
    finally:
        ch.close()


def start_router(model, stages, extra=()):
    args = ["router", "--model", model, "--listen", "127.0.0.1:0"]
    for s in stages:
        args += ["--stage", s]
    return Proc([*args, *extra], role="router")


def stub(addr):
    ch = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)])
    return pb_grpc.GenerationStub(ch), ch


def model_info(addr, timeout=5):
    s, ch = stub(addr)
    try:
        return s.ModelInfo(pb.ModelInfoRequest(), timeout=timeout)
    finally:
        ch.close()


def wait_healthy(addr, timeout=120):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            info = model_info(addr)
            if info.healthy:
                return info
            last = info.stages
        except grpc.RpcError as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"router {addr} not healthy: {last}")


def split_layers(n, p):
    return [(i * n // p, (i + 1) * n // p) for i in range(p)]


@contextlib.contextmanager
def cluster(model, stages=1, shards=1, dtype="f32", kv_blocks=256, router_args=(), threads=1, worker_args=(),
            worker_bin=None):
    """P workers + a router on loopback; yields (router_addr, workers, router)."""
    import json

    n = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    workers = []
    router = None
    try:
        for layers in split_layers(n, stages):
            workers.append(start_worker(model, layers, shards=shards, dtype=dtype, kv_blocks=kv_blocks,
                                        threads=threads, extra=worker_args, bin=worker_bin))
        router = start_router(model, [w.addr for w in workers], extra=router_args)
        wait_healthy(router.addr)
        yield router.addr, workers, router
    finally:
        for p in ([router] if router else []) + workers:
            p.stop()


class Result:
    def __init__(self):
        self.ids, self.text, self.logprobs, self.messages = [], "", [], []
        self.finish_reason = None
        self.usage = None
        self.stop_reason = ""


def generate(s, timeout=120, metadata=None, **fields):
    """Runs Generate to completion; returns a Result (raises grpc.RpcError on failure)."""
    req = pb.GenerateRequest(**fields)
    r = Result()
    for m in s.Generate(req, timeout=timeout, metadata=metadata):
        r.messages.append(m)
        r.ids += list(m.token_ids)
        r.text += m.text
        r.logprobs += list(m.logprobs)
        if m.finish_reason:
            r.finish_reason = pb.FinishReason.Name(m.finish_reason)
            r.usage = m.usage
            r.stop_reason = m.stop_reason
    return r


def greedy(max_new, ignore_eos=True, **extra):
    """Greedy decoding of exactly `max_new` tokens unless a stop condition in `extra` (or, with
    ignore_eos=False, EOS) ends it first."""
    return dict(sampling=pb.SamplingParameters(temperature=0.0),
                stopping=pb.StoppingCriteria(max_new_tokens=max_new, ignore_eos=ignore_eos, **extra))
