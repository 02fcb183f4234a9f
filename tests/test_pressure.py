"""The scheduler under memory pressure, end to end: tiny cache pools and step budgets force
preemption and recompute; every stream must still equal its single-stream result, end with a finish
reason or an error status, and leave every block free. Also: a dying scheduler, closed stages, a
failed step that still reaches every stage, per-stage health, and a pool sized from memory."""

import concurrent.futures as cf
import os
import random
import time

import grpc
import pytest

from conftest import generate_json
from harness import Proc, cluster, generate, greedy, health_grpc, health_pb, model_info, pb, stage_grpc, stage_pb, \
    start_router, start_worker, stub, wait_healthy
from test_pipeline import small  # noqa: F401  (fixture)

# Issue 14's scenario: 24 blocks of 16 (384 slots), 64 tokens a step, 8 requests of 90-140 prompt
# tokens and 40 new tokens each: all fit alone, together they need about twice the pool.
POOL = dict(kv_blocks=24)


def prompts(seed, n, shared=0, vocab=512):
    rnd = random.Random(seed)
    prefix = [rnd.randrange(2, vocab) for _ in range(shared)]
    return [prefix + [rnd.randrange(2, vocab) for _ in range(rnd.randrange(90, 141) - shared)] for _ in range(n)]


def run_concurrently(addr, reqs, new=40):
    s, ch = stub(addr)
    try:
        with cf.ThreadPoolExecutor(len(reqs)) as ex:
            futs = [ex.submit(generate, s, 300, None, input_ids=pb.TokenIds(ids=p), **greedy(new)) for p in reqs]
            return [f.result() for f in futs]
    finally:
        ch.close()


def assert_all_free(addr):
    """Blocks come back once the last stream ended (the release may take a step)."""
    deadline = time.time() + 10
    while True:
        info = model_info(addr)
        if info.kv_blocks_free == info.kv_blocks_total and info.running_sequences == 0 \
                and info.waiting_sequences == 0:
            return info
        assert time.time() < deadline, f"blocks not freed: {info}"
        time.sleep(0.05)


@pytest.mark.parametrize("stages,caching,shared", [(2, "false", 0), (3, "true", 48)])
def test_pressure_every_stream_equals_its_single_stream_result(small, stages, caching, shared):  # noqa: F811
    reqs = prompts(stages, 8, shared=shared)
    with cluster(small, stages=stages, **POOL,
                 router_args=["--max-batch-tokens", "64", "--prefix-caching", caching]) as (addr, _, _):
        s, ch = stub(addr)
        alone = [generate(s, 300, None, input_ids=pb.TokenIds(ids=p), **greedy(40)) for p in reqs]
        ch.close()
        before = model_info(addr).preemptions
        together = run_concurrently(addr, reqs)
        for i, (a, t) in enumerate(zip(alone, together)):
            assert t.finish_reason == "FINISH_REASON_LENGTH", (i, t.finish_reason)
            assert t.ids == a.ids, f"request {i}: concurrent output differs from its single-stream output"
            assert t.usage.completion_tokens == 40
        info = assert_all_free(addr)
        assert info.preemptions > before, "the scenario must exercise preemption"
        # The router still serves, and frees everything again.
        again = run_concurrently(addr, reqs[:3])
        assert [r.ids for r in again] == [a.ids for a in alone[:3]]
        assert_all_free(addr)
        h = health_grpc.HealthStub(grpc.insecure_channel(addr))
        assert h.Check(health_pb.HealthCheckRequest(service="")).status == health_pb.HealthCheckResponse.SERVING


def test_a_request_that_cannot_fit_alone_is_refused_naming_the_limit(small):  # noqa: F811
    with cluster(small, stages=1, **POOL) as (addr, _, _):
        s, ch = stub(addr)
        info = model_info(addr)
        assert info.kv_capacity_tokens == 24 * 16 and info.max_total_tokens == 384
        with pytest.raises(grpc.RpcError) as e:
            generate(s, input_ids=pb.TokenIds(ids=[5] * 300), **greedy(100))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "384 tokens" in e.value.details()
        assert generate(s, input_ids=pb.TokenIds(ids=[5] * 300), **greedy(84)).usage.completion_tokens == 84
        assert info.max_new_tokens >= 32768, "the default limit covers long reasoning traces"
        ch.close()


def test_generate_under_pressure_equals_ample_cache(small):  # noqa: F811
    """`mlaserve generate` runs the same planner: a pool too small for the batch preempts and
    recomputes, and the tokens stay the same."""
    reqs = prompts(7, 6)
    ample = generate_json(small, reqs, 24)
    tight = generate_json(small, reqs, 24, "--kv-blocks", "12", "--step-tokens", "48")
    assert tight == ample


def test_a_dying_scheduler_ends_streams_with_an_error_and_the_router_exits(small):  # noqa: F811
    w = start_worker(small, (0, 6))
    r = Proc(["router", "--model", small, "--listen", "127.0.0.1:0", "--stage", w.addr],
             env={"MLASERVE_FAULT_SCHEDULER_PANIC_AFTER_STEPS": "3"}, role="router")
    try:
        wait_healthy(r.addr)
        s, ch = stub(r.addr)
        with pytest.raises(grpc.RpcError) as e:
            generate(s, input_ids=pb.TokenIds(ids=[3, 4, 5]), **greedy(20))
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), e.value
        ch.close()
        assert r.p.wait(15) != 0, "the router must exit non-zero so that it is restarted"
        assert "scheduler" in r.stderr()
    finally:
        r.kill()
        w.stop()


def test_closed_stages_accept_only_the_token_holder(small, tmp_path):  # noqa: F811
    token = "stage-secret-7f3a9c"
    f = tmp_path / "token"
    f.write_text(token + "\n")
    w1 = start_worker(small, (0, 3), extra=["--stage-token-file", f], token=token)
    w2 = start_worker(small, (3, 6), extra=["--stage-token-file", f], token=token)
    r = start_router(small, [w1.addr, w2.addr], extra=["--stage-token-file", f])
    try:
        wait_healthy(r.addr, timeout=120)
        s, ch = stub(r.addr)
        assert generate(s, input_ids=pb.TokenIds(ids=[3, 4, 5]), **greedy(5)).finish_reason
        ch.close()
        for w in (w1, w2):
            c = grpc.insecure_channel(w.addr)
            st = stage_grpc.StageStub(c)
            for md in (None, [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as e:
                    st.Info(stage_pb.InfoRequest(), timeout=5, metadata=md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    list(st.Run(iter([stage_pb.StageMessage(connect=stage_pb.Connect())]), timeout=5, metadata=md))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert st.Info(stage_pb.InfoRequest(), timeout=5, metadata=[("authorization", f"Bearer {token}")])
            c.close()
        # A router without the token cannot use the stages.
        stranger = start_router(small, [w1.addr, w2.addr])
        time.sleep(1.5)
        assert not model_info(stranger.addr).healthy
        assert "nauthenticated" in model_info(stranger.addr).stages[0].error or \
            "token" in model_info(stranger.addr).stages[0].error
        stranger.stop()
    finally:
        r.stop()
        for w in (w1, w2):
            w.stop()
            assert token not in w.stderr(), "the stage token leaked into the worker's log"
    assert token not in r.stderr()


def test_per_stage_health_is_each_stages_own(small):  # noqa: F811
    with cluster(small, stages=2) as (addr, workers, _):
        info = model_info(addr)
        assert [st.healthy for st in info.stages] == [True, True]
        workers[1].kill()
        deadline = time.time() + 15
        while True:
            info = model_info(addr)
            if not info.healthy and info.stages[0].healthy and not info.stages[1].healthy:
                break
            assert time.time() < deadline, info
            time.sleep(0.1)
        assert info.stages[1].error and not info.stages[0].error


def test_a_step_failing_midway_still_releases_on_every_stage(small):  # noqa: F811
    """Stage 0 has fewer blocks than stage 1, so a step naming a block only stage 1 holds fails at
    stage 0. That step's release list must still reach stage 1 (and the failure come back once)."""
    w0 = start_worker(small, (0, 3), kv_blocks=16)
    w1 = start_worker(small, (3, 6), kv_blocks=64)
    ch = grpc.insecure_channel(w0.addr)
    try:
        st = stage_grpc.StageStub(ch)
        hop = stage_pb.Hop(address=w1.addr, layer_start=3, layer_end=6)
        setup = stage_pb.SequenceSetup(sampling=stage_pb.SamplingSettings(top_p=1.0, repetition_penalty=1.0),
                                       prompt_len=3)

        def work(seq, block):
            return stage_pb.SeqWork(seq_id=seq, cached=0, token_ids=[3, 4, 5], new_blocks=[block], sample=True,
                                    setup=setup)

        msgs = [
            stage_pb.StageMessage(connect=stage_pb.Connect(downstream=[hop], session_id="t", expect_layer_start=0,
                                                           expect_layer_end=3)),
            stage_pb.StageMessage(step=stage_pb.Step(step_id=1, seqs=[work(1, 0)])),
            stage_pb.StageMessage(step=stage_pb.Step(step_id=2, release=[1], seqs=[work(2, 40)])),
        ]
        import queue
        q = queue.Queue()
        for m in msgs:
            q.put(m)
        results = []
        stream = st.Run(iter(q.get, None), timeout=30)
        for r in stream:
            results.append(r)
            if len(results) == 2:
                break
        assert results[0].step_id == 1 and not results[0].HasField("error")
        assert results[1].step_id == 2 and results[1].HasField("error"), results[1]
        assert "outside the cache" in results[1].error.message
        for w in (w0, w1):
            c = grpc.insecure_channel(w.addr)
            info = stage_grpc.StageStub(c).Info(stage_pb.InfoRequest(), timeout=5)
            assert info.active_sequences == 0, f"{w.addr} still holds sequences"
            c.close()
        q.put(None)
        stream.cancel()
    finally:
        ch.close()
        w0.stop()
        w1.stop()


def test_kv_pool_sized_from_memory(small):  # noqa: F811
    # small: kv_lora 64 + rope 16 = 80 values per token and layer, f32: 320 bytes; 3 layers
    # (+ no MTP on a first stage): 960 bytes a token, 15,360 a block of 16.
    w = start_worker(small, (0, 3), kv_blocks=0, extra=["--kv-cache-memory", "1500KiB"])
    w2 = start_worker(small, (3, 6), kv_blocks=0, extra=["--kv-cache-memory", "0.001"])
    try:
        for x, expect in ((w, 100), (w2, None)):
            c = grpc.insecure_channel(x.addr)
            info = stage_grpc.StageStub(c).Info(stage_pb.InfoRequest(), timeout=5)
            c.close()
            if expect is not None:
                assert info.kv_blocks == expect
            else:
                assert info.kv_blocks > 0
        r = start_router(small, [w.addr, w2.addr])
        wait_healthy(r.addr)
        info = model_info(r.addr)
        assert info.kv_blocks_total == min(100, info.kv_blocks_total) and info.kv_capacity_tokens == \
            info.kv_blocks_total * 16
        r.stop()
    finally:
        w.stop()
        w2.stop()
    with pytest.raises(RuntimeError):
        start_worker(small, (0, 3), kv_blocks=0, extra=["--kv-cache-memory", "2"])
