"""Replicated pipelines on loopback: two independent router + stage sets stand in for two
LeaderWorkerSet groups of the Helm chart (deployment.mode=leaderworkerset), behind a client-side round
robin in place of the Service across the groups' routers.

Every stream equals its single-stream result whichever group serves it; killing a stage of one group
fails that group's streams with UNAVAILABLE and nothing else: the other group keeps streaming and
takes new requests.
"""

import contextlib
import subprocess
import threading
import time

import grpc
import pytest

from conftest import BIN, tiny  # noqa: F401  (fixture)
from harness import wait_stage_ready, generate, health_grpc, health_pb, model_info, pb, stage_grpc, stage_pb, start_router, start_worker, stub, \
    wait_healthy

STAGE_SERVICE = "mlaserve.internal.v1.Stage"

PROMPTS = [[3, 4, 5], [7, 1, 9, 2], [11, 12], [5, 5, 5, 5, 5], [2, 30, 7], [13, 3, 21, 8, 1]]
NEW = 12


TOKEN = "replicas-test-token"


def stage_token_supported() -> bool:
    p = subprocess.run([BIN, "worker", "--help"], capture_output=True, text=True, timeout=60)
    return "--stage-token-file" in p.stdout


@contextlib.contextmanager
def two_groups(model, tmp_path, stages=2):
    """Two groups of `stages` workers + a router each; yields [(router_addr, workers, router), ...].
    With the stage token (as the chart turns on by default) both groups share one token file."""
    extra, token = (), None
    if stage_token_supported():
        token = TOKEN
        (tmp_path / "stage-token").write_text(f"{TOKEN}\n")
        extra = ("--stage-token-file", tmp_path / "stage-token")
    n = 4  # tiny: 4 layers
    bounds = [(i * n // stages, (i + 1) * n // stages) for i in range(stages)]
    procs, groups = [], []
    try:
        for _ in range(2):
            workers = [start_worker(model, b, kv_blocks=512, extra=extra, wait=False) for b in bounds]
            procs += workers
            for w in workers:
                wait_stage_ready(w, token=token)
            router = start_router(model, [w.addr for w in workers], extra=extra)
            procs.append(router)
            wait_healthy(router.addr)
            groups.append((router.addr, workers, router))
        yield groups
    finally:
        for p in reversed(procs):
            p.stop()


def request(i):
    """Greedy for even i, seeded sampling for odd i (each request has its own seeded stream, so the
    result does not depend on the batch it shares)."""
    ids = pb.TokenIds(ids=PROMPTS[i % len(PROMPTS)])
    stopping = pb.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True)
    if i % 2 == 0:
        return dict(input_ids=ids, sampling=pb.SamplingParameters(temperature=0.0), stopping=stopping)
    return dict(input_ids=ids, sampling=pb.SamplingParameters(temperature=1.0, top_k=20, seed=1000 + i), stopping=stopping)


def test_round_robin_over_two_groups_equals_single_streams(tiny, tmp_path):  # noqa: F811
    with two_groups(tiny, tmp_path) as groups:
        addrs = [g[0] for g in groups]
        # Both groups hold the whole model in their own stages: no stage address is shared.
        infos = [model_info(a) for a in addrs]
        assert all(i.healthy for i in infos)
        assert [(s.layer_start, s.layer_end) for s in infos[0].stages] == [(s.layer_start, s.layer_end) for s in infos[1].stages]
        assert not {w.addr for w in groups[0][1]} & {w.addr for w in groups[1][1]}

        n = 2 * len(PROMPTS)
        stubs = [stub(a) for a in addrs]
        try:
            # Single streams, one at a time, on each group: the same model gives the same results.
            single = [[generate(s, **request(i)).ids for i in range(n)] for s, _ in stubs]
            assert single[0] == single[1]
            assert all(len(ids) == NEW for ids in single[0])
            # All at once, round robin over the groups (the client-side stand-in for the Service).
            results, errors = [None] * n, []

            def run(i):
                try:
                    results[i] = generate(stubs[i % 2][0], **request(i)).ids
                except grpc.RpcError as e:
                    errors.append((i, e.code(), e.details()))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert results == single[0]
        finally:
            for _, ch in stubs:
                ch.close()


def test_a_dead_stage_fails_only_its_own_groups_streams(tiny, tmp_path):  # noqa: F811
    with two_groups(tiny, tmp_path) as groups:
        (addr_a, workers_a, _), (addr_b, _, _) = groups
        stubs = {"a": stub(addr_a), "b": stub(addr_b)}
        reference = generate(stubs["b"][0], **request(0)).ids
        outcome = {}
        started = {k: threading.Event() for k in ("a0", "a1", "b0", "b1")}

        def long_stream(key):
            s = stubs[key[0]][0]
            # Group a's streams are long enough to be running when its stage dies (seconds, within
            # the stages' 8192-token cache); group b's are held open across the kill by the reader.
            new = 3000 if key[0] == "a" else 400
            req = pb.GenerateRequest(input_ids=pb.TokenIds(ids=PROMPTS[int(key[1])]),
                                     sampling=pb.SamplingParameters(temperature=0.0),
                                     stopping=pb.StoppingCriteria(max_new_tokens=new, ignore_eos=True))
            n = 0
            try:
                for m in s.Generate(req, timeout=120):
                    n += len(m.token_ids)
                    if n >= 3:
                        started[key].set()
                    if key[0] == "b" and n >= 3 and not killed.is_set():
                        killed.wait(30)  # hold group b's streams open across the kill
                outcome[key] = ("ok", n)
            except grpc.RpcError as e:
                outcome[key] = (e.code(), e.details(), time.time())

        killed = threading.Event()
        threads = {k: threading.Thread(target=long_stream, args=(k,)) for k in started}
        try:
            for t in threads.values():
                t.start()
            for k, ev in started.items():
                assert ev.wait(60), f"stream {k} did not start"
            killed_at = time.time()
            workers_a[1].kill()  # group a's last stage dies (a pod of the group lost)
            killed.set()
            for t in threads.values():
                t.join(120)
                assert not t.is_alive()
            # Group a's streams fail fast with UNAVAILABLE; group b's run to their end.
            for k in ("a0", "a1"):
                code, details, at = outcome[k]
                assert code == grpc.StatusCode.UNAVAILABLE, outcome[k]
                assert at - killed_at < 10
            for k in ("b0", "b1"):
                assert outcome[k] == ("ok", 400), outcome[k]
            # Afterwards group b still serves, with the same result as before; group a refuses.
            assert generate(stubs["b"][0], **request(0)).ids == reference
            assert model_info(addr_b).healthy
            with pytest.raises(grpc.RpcError) as e:
                generate(stubs["a"][0], timeout=30, **request(0))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not model_info(addr_a).healthy
        finally:
            killed.set()
            for _, ch in stubs.values():
                ch.close()


def test_a_stage_refuses_a_run_without_the_token(tiny, tmp_path):  # noqa: F811
    """The closed stage of a group: a caller without the shared token (a stranger, not the group's
    router) is refused before any session starts."""
    if not stage_token_supported():
        pytest.skip(f"{BIN} has no --stage-token-file yet (the stage token of the scheduler issue)")
    token = tmp_path / "stage-token"
    token.write_text(f"{TOKEN}\n")
    w = start_worker(tiny, (0, 4), extra=("--stage-token-file", token), wait=False)
    try:
        wait_stage_ready(w, token=TOKEN)
        # Health stays open for the kubelet's probes.
        with grpc.insecure_channel(w.addr) as ch:
            assert health_grpc.HealthStub(ch).Check(health_pb.HealthCheckRequest(service=STAGE_SERVICE), timeout=5).status == 1
        with grpc.insecure_channel(w.addr) as ch:
            connect = stage_pb.StageMessage(connect=stage_pb.Connect(session_id="stranger", expect_layer_start=0,
                                                                     expect_layer_end=4))
            with pytest.raises(grpc.RpcError) as e:
                list(stage_grpc.StageStub(ch).Run(iter([connect]), timeout=10))
            assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), e.value
            # Nor with another group's (or a wrong) token.
            with pytest.raises(grpc.RpcError) as e:
                stage_grpc.StageStub(ch).Info(stage_pb.InfoRequest(), timeout=5, metadata=[("authorization", "Bearer other")])
            assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), e.value
        # The group's own router (same token) connects to it.
        r = start_router(tiny, [w.addr], extra=("--stage-token-file", token))
        try:
            wait_healthy(r.addr)
        finally:
            r.stop()
    finally:
        w.stop()
