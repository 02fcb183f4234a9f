"""Bad input, faults, overload, cancellation storms, graceful shutdown and a bounded soak."""

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import threading
import time

import grpc
import pytest

from harness import Proc, cluster, generate, greedy, health_grpc, health_pb, model_info, pb, pb_grpc, stage_grpc, \
    stage_pb, start_router, start_worker, stub, wait_healthy
from test_pipeline import small  # noqa: F401  (fixture)

RAISING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and m['content'] == 'raise' %}{{ raise_exception('system prompt rejected') }}{% endif %}"
    "{% if m['content'] == 'loop' %}{% for i in range(10000) %}{% for j in range(10000) %}{{ j }}{% endfor %}"
    "{% endfor %}{% endif %}"
    "<｜User｜>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


@pytest.fixture(scope="module")
def guarded(small, tmp_path_factory):  # noqa: F811
    """`small` with a template that raises on request and one that loops."""
    m = tmp_path_factory.mktemp("guarded") / "model"
    shutil.copytree(small, m)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["chat_template"] = RAISING_TEMPLATE
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    with cluster(m, stages=2) as c:
        yield c[0]


def _bad_requests():
    ids = pb.TokenIds(ids=[1, 2, 3])
    sp, st, msg = pb.SamplingParameters, pb.StoppingCriteria, pb.ChatMessage
    inv = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("no input", dict(), inv),
        ("prompt and ids", dict(prompt="x", input_ids=ids), inv),
        ("prompt and messages", dict(prompt="x", messages=[msg(role="user", content="x")]), inv),
        ("empty prompt", dict(prompt=""), inv),
        ("empty ids", dict(input_ids=pb.TokenIds()), inv),
        ("id >= vocab", dict(input_ids=pb.TokenIds(ids=[512])), inv),
        ("unknown role", dict(messages=[msg(role="wizard", content="x")]), inv),
        ("image content", dict(messages=[msg(role="user", parts=[pb.ContentPart(image=b"\x89PNG")])]), inv),
        ("content and parts", dict(messages=[msg(role="user", content="a", parts=[pb.ContentPart(text="b")])]), inv),
        ("no content", dict(messages=[msg(role="user")]), inv),
        ("tool call on user", dict(messages=[msg(role="user", content="x", tool_calls=[pb.ToolCall(
            function=pb.FunctionCall(name="f", arguments="{}"))])]), inv),
        ("tool call no name", dict(messages=[msg(role="assistant", tool_calls=[pb.ToolCall(
            function=pb.FunctionCall(name="", arguments="{}"))])]), inv),
        ("tool args not json", dict(messages=[msg(role="assistant", tool_calls=[pb.ToolCall(
            function=pb.FunctionCall(name="f", arguments="{"))])]), inv),
        ("tool args not object", dict(messages=[msg(role="assistant", tool_calls=[pb.ToolCall(
            function=pb.FunctionCall(name="f", arguments="[1]"))])]), inv),
        ("tool schema not json", dict(messages=[msg(role="user", content="x")], tools=[pb.Tool(
            function=pb.FunctionDefinition(name="f", parameters_json="nope"))]), inv),
        ("tools with prompt", dict(prompt="x", tools=[pb.Tool(function=pb.FunctionDefinition(name="f"))]), inv),
        ("temperature < 0", dict(input_ids=ids, sampling=sp(temperature=-1)), inv),
        ("temperature nan", dict(input_ids=ids, sampling=sp(temperature=float("nan"))), inv),
        ("top_p 0", dict(input_ids=ids, sampling=sp(top_p=0)), inv),
        ("top_p > 1", dict(input_ids=ids, sampling=sp(top_p=1.01)), inv),
        ("min_p > 1", dict(input_ids=ids, sampling=sp(min_p=1.5)), inv),
        ("repetition 0", dict(input_ids=ids, sampling=sp(repetition_penalty=0)), inv),
        ("repetition huge", dict(input_ids=ids, sampling=sp(repetition_penalty=1e9)), inv),
        ("frequency", dict(input_ids=ids, sampling=sp(frequency_penalty=2.5)), inv),
        ("presence", dict(input_ids=ids, sampling=sp(presence_penalty=-2.5)), inv),
        ("top_logprobs", dict(input_ids=ids, top_logprobs=21), inv),
        ("max_new_tokens 0", dict(input_ids=ids, stopping=st(max_new_tokens=0)), inv),
        ("max_new_tokens > limit", dict(input_ids=ids, stopping=st(max_new_tokens=32769)), inv),
        # Within the model's context (163,840) but beyond the cache pool (2 stages of 256 x 16).
        ("prompt + max over the cache pool", dict(input_ids=pb.TokenIds(ids=[3] * 3000),
                                                  stopping=st(max_new_tokens=3000)), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("prompt over the cache pool", dict(input_ids=pb.TokenIds(ids=[3] * 5000)), grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("prompt over context", dict(input_ids=pb.TokenIds(ids=[3] * 163841)), inv),
        ("too many stops", dict(input_ids=ids, stopping=st(stop=["s"] * 9)), inv),
        ("empty stop", dict(input_ids=ids, stopping=st(stop=[""])), inv),
        ("long stop", dict(input_ids=ids, stopping=st(stop=["x" * 1000])), inv),
        ("stop token >= vocab", dict(input_ids=ids, stopping=st(stop_token_ids=[100000])), inv),
        ("bad request id", dict(input_ids=ids, request_id=""), inv),
        ("template raises", dict(messages=[msg(role="system", content="raise"), msg(role="user", content="x")]),
         inv),
        ("template loops", dict(messages=[msg(role="user", content="loop")]), inv),
        ("huge message", dict(prompt="x" * (5 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]


def test_bad_input_table(guarded):
    cases = _bad_requests()
    assert len(cases) >= 30
    s, ch = stub(guarded)
    failures = []
    for name, fields, code in cases:
        try:
            generate(s, timeout=30, **fields)
            failures.append((name, "accepted"))
        except grpc.RpcError as e:
            if e.code() != code:
                failures.append((name, e.code(), e.details()))
            elif code == grpc.StatusCode.INVALID_ARGUMENT and not e.details():
                failures.append((name, "no message"))
    assert not failures, failures
    # Everyone else is still served.
    r = generate(s, input_ids=pb.TokenIds(ids=[1, 2, 3]), **greedy(4))
    assert len(r.ids) == 4 and r.finish_reason == "FINISH_REASON_LENGTH"
    r = generate(s, messages=[pb.ChatMessage(role="user", content="fine")], **greedy(2))
    assert len(r.ids) == 2
    ch.close()


def free_port():
    with socket.socket() as sck:
        sck.bind(("127.0.0.1", 0))
        return sck.getsockname()[1]


def health_status(addr):
    ch = grpc.insecure_channel(addr)
    try:
        return health_grpc.HealthStub(ch).Check(health_pb.HealthCheckRequest(service=""), timeout=5).status
    finally:
        ch.close()


def test_worker_restart_degrades_then_recovers(small):  # noqa: F811
    health_pb2 = health_pb
    port = free_port()
    w0 = start_worker(small, (0, 3))
    # The second stage on a fixed port, so that it can come back at the same address.
    w1 = Proc(["worker", "--model", small, "--layers", "3..6", "--listen", f"127.0.0.1:{port}", "--kv-blocks", 256,
               "--dtype", "f32"], env={"MLASERVE_THREADS": "1"}, role="worker")
    r = start_router(small, [w0.addr, w1.addr])
    try:
        wait_healthy(r.addr)
        s, ch = stub(r.addr)
        assert len(generate(s, input_ids=pb.TokenIds(ids=[5, 6]), **greedy(3)).ids) == 3
        w1.kill()
        deadline = time.time() + 5
        while time.time() < deadline and model_info(r.addr).healthy:
            time.sleep(0.05)
        info = model_info(r.addr)
        assert not info.healthy and any(st.error for st in info.stages), info
        assert health_status(r.addr) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            generate(s, input_ids=pb.TokenIds(ids=[5, 6]), **greedy(3))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # The worker comes back on the same address: the router reconnects by itself.
        w1 = Proc(["worker", "--model", small, "--layers", "3..6", "--listen", f"127.0.0.1:{port}", "--kv-blocks",
                   256, "--dtype", "f32"], env={"MLASERVE_THREADS": "1"}, role="worker")
        wait_healthy(r.addr, timeout=30)
        assert health_status(r.addr) == health_pb2.HealthCheckResponse.SERVING
        assert len(generate(s, input_ids=pb.TokenIds(ids=[5, 6]), **greedy(3)).ids) == 3
        ch.close()
    finally:
        r.stop()
        w0.stop()
        w1.stop()


async def _cancel_storm(addr, n, seed):
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(addr) as ch:
        s = pb_grpc.GenerationStub(ch)

        async def one(i):
            ids = [rng.randrange(2, 500) for _ in range(rng.randrange(1, 60))]
            call = s.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=ids), **greedy(rng.randrange(5, 200))))
            stop_after = rng.randrange(0, 8)
            got = 0
            try:
                if stop_after == 0:
                    await asyncio.sleep(rng.random() * 0.01)
                    call.cancel()
                    return
                async for _ in call:
                    got += 1
                    if got >= stop_after:
                        call.cancel()
                        return
            except (grpc.RpcError, asyncio.CancelledError) as e:
                if isinstance(e, grpc.RpcError) and e.code() != grpc.StatusCode.CANCELLED:
                    raise

        sem = asyncio.Semaphore(64)

        async def limited(i):
            async with sem:
                await one(i)

        await asyncio.gather(*(limited(i) for i in range(n)))


def _drained(addr, workers, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = model_info(addr)
        if info.kv_blocks_free == info.kv_blocks_total and info.running_sequences == 0 \
                and info.waiting_sequences == 0:
            active = []
            for w in workers:
                ch = grpc.insecure_channel(w.addr)
                active.append(stage_grpc.StageStub(ch).Info(stage_pb.InfoRequest(), timeout=5).active_sequences)
                ch.close()
            if not any(active):
                return info
        time.sleep(0.1)
    raise AssertionError(f"not drained: {model_info(addr)}")


def test_thousand_cancelled_streams_leave_nothing_behind(small):  # noqa: F811
    with cluster(small, stages=2) as (addr, workers, _):
        asyncio.run(_cancel_storm(addr, 1000, seed=1))
        _drained(addr, workers)
        s, ch = stub(addr)
        assert len(generate(s, input_ids=pb.TokenIds(ids=[9]), **greedy(3)).ids) == 3
        ch.close()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_overload_is_rejected_fast_and_accepted_requests_finish(small):  # noqa: F811
    with cluster(small, stages=1, router_args=["--max-queue", "8", "--max-running", "4"]) as (addr, workers, router):
        rss0 = rss_kb(router.p.pid)

        async def burst():
            async with grpc.aio.insecure_channel(addr) as ch:
                s = pb_grpc.GenerationStub(ch)

                async def one(i):
                    t0 = time.time()
                    try:
                        n = 0
                        async for m in s.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[3 + i % 50] * 10),
                                                                     **greedy(20))):
                            n += len(m.token_ids)
                        return ("ok", n, time.time() - t0)
                    except grpc.RpcError as e:
                        return (e.code(), e.details(), time.time() - t0)

                return await asyncio.gather(*(one(i) for i in range(300)))

        results = asyncio.run(burst())
        ok = [r for r in results if r[0] == "ok"]
        rejected = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(ok) + len(rejected) == len(results), [r for r in results if r[0] not in ("ok",
                                                         grpc.StatusCode.RESOURCE_EXHAUSTED)][:3]
        assert rejected and ok
        assert all(r[1] == 20 for r in ok), "accepted requests complete"
        assert max(r[2] for r in rejected) < 2.0, "rejections are immediate"
        assert "queue" in rejected[0][1]
        assert rss_kb(router.p.pid) < rss0 + 100_000, "router memory stays bounded"
        _drained(addr, workers)


def test_sigterm_drains_streams_then_exits_zero(small):  # noqa: F811
    w = start_worker(small, (0, 6))
    r = start_router(small, [w.addr], extra=["--drain-timeout-secs", "20"])
    try:
        wait_healthy(r.addr)
        s, ch = stub(r.addr)
        out = {}

        def run():
            try:
                out["r"] = generate(s, input_ids=pb.TokenIds(ids=[4, 5]), **greedy(300))
            except grpc.RpcError as e:
                out["e"] = e

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 10
        while time.time() < deadline and model_info(r.addr).running_sequences == 0:
            time.sleep(0.01)
        r.p.send_signal(signal.SIGTERM)
        t.join(30)
        assert "r" in out and len(out["r"].ids) == 300, out.get("e")
        assert r.p.wait(30) == 0
        ch.close()
        # The port no longer accepts new calls.
        s2, ch2 = stub(r.addr)
        with pytest.raises(grpc.RpcError) as e:
            generate(s2, timeout=3, input_ids=pb.TokenIds(ids=[1]), **greedy(1))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        ch2.close()
    finally:
        r.stop()
        w.stop()


SOAK_SECS = float(os.environ.get("MLASERVE_SOAK_SECS", "120"))


def test_bounded_soak(small):  # noqa: F811
    """Mixed lengths, sampling and cancellations for SOAK_SECS (default 120 s): no error other than the
    injected cancellations, no leaked blocks, stable memory."""
    with cluster(small, stages=2) as (addr, workers, router):
        procs = [router] + workers

        async def soak():
            rng = random.Random(7)
            stats = {"ok": 0, "cancelled": 0, "errors": []}
            end = time.time() + SOAK_SECS
            async with grpc.aio.insecure_channel(addr) as ch:
                s = pb_grpc.GenerationStub(ch)

                async def client(k):
                    while time.time() < end:
                        ids = [rng.randrange(2, 500) for _ in range(rng.choice([1, 8, 40, 200]))]
                        sampling = pb.SamplingParameters(temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.randrange(1000))
                        req = pb.GenerateRequest(input_ids=pb.TokenIds(ids=ids), sampling=sampling,
                                                 stopping=pb.StoppingCriteria(max_new_tokens=rng.choice([1, 16, 64]),
                                                                              ignore_eos=True))
                        cancel_at = rng.choice([None, None, None, 1, 5])
                        call = s.Generate(req)
                        n = 0
                        try:
                            async for m in call:
                                n += len(m.token_ids)
                                if cancel_at and n >= cancel_at:
                                    call.cancel()
                                    stats["cancelled"] += 1
                                    break
                            else:
                                stats["ok"] += 1
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.CANCELLED:
                                stats["errors"].append((e.code(), e.details()))
                        except asyncio.CancelledError:
                            stats["cancelled"] += 1

                await asyncio.gather(*(client(k) for k in range(16)))
            return stats

        rss_start = None

        def sample():
            return [rss_kb(p.p.pid) for p in procs]

        # Warm up the allocator before taking the baseline.
        asyncio.run(_cancel_storm(addr, 50, seed=3))
        rss_start = sample()
        stats = asyncio.run(soak())
        rss_end = sample()
        assert not stats["errors"], stats["errors"][:5]
        assert stats["ok"] > 20 and stats["cancelled"] > 5, stats
        _drained(addr, workers)
        for a, b in zip(rss_start, rss_end):
            assert b < a * 1.25 + 50_000, f"memory grew from {a} kB to {b} kB"
        print(f"soak {SOAK_SECS:.0f}s: {stats['ok']} completed, {stats['cancelled']} cancelled, "
              f"RSS kB {rss_start} -> {rss_end}")
