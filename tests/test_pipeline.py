"""Pipeline stages in separate processes on loopback (issue: worker service)."""

import json
import threading
import time

import grpc
import pytest

import ds3_reference
from conftest import checkpoint, generate_json, reference
from harness import cluster, generate, greedy, model_info, pb, stage_grpc, stage_pb, start_worker, stub
from test_model_parity import greedy_prompts


@pytest.fixture(scope="session")
def small():
    return checkpoint("small-f32", "small", dtype="f32")


@pytest.fixture(scope="session")
def small_cases(small):
    """Prompts with clear greedy margins, their transformers continuations, and ours (single process)."""
    cases = greedy_prompts(small, 4, [2, 9, 17, 40], steps=16)
    ours = generate_json(small, [c[0] for c in cases], 16)
    assert ours == [c[1] for c in cases], "single-process generate must match transformers"
    return cases


def concurrent_greedy(addr, cases, n=16):
    """Greedy continuations of the cases' prompts, requested concurrently so they share steps."""
    s, ch = stub(addr)
    results = [None] * len(cases)

    def run(i):
        results[i] = generate(s, input_ids=pb.TokenIds(ids=cases[i][0]), **greedy(n)).ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.close()
    return results


@pytest.mark.parametrize("stages,shards", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_pipeline_greedy_equals_single_process(small, small_cases, stages, shards):
    with cluster(small, stages=stages, shards=shards) as (addr, workers, _):
        info = model_info(addr)
        assert [(s.layer_start, s.layer_end) for s in info.stages] == \
            [(i * 6 // stages, (i + 1) * 6 // stages) for i in range(stages)]
        assert all(s.expert_shards == shards for s in info.stages)
        assert concurrent_greedy(addr, small_cases) == [c[1] for c in small_cases]


def test_stage_info_and_layer_checks(small):
    w = start_worker(small, (2, 4), shards=2)
    try:
        ch = grpc.insecure_channel(w.addr)
        st = stage_grpc.StageStub(ch)
        info = st.Info(stage_pb.InfoRequest(), timeout=10)
        assert (info.layer_start, info.layer_end, info.first, info.last) == (2, 4, False, False)
        assert info.expert_shards == 2 and info.num_hidden_layers == 6
        # A caller expecting other layers is refused with a clear status.
        connect = stage_pb.StageMessage(connect=stage_pb.Connect(session_id="t", expect_layer_start=0,
                                                                 expect_layer_end=3))
        with pytest.raises(grpc.RpcError) as e:
            list(st.Run(iter([connect]), timeout=10))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds layers 2..4" in e.value.details()
        ch.close()
    finally:
        w.stop()


def test_worker_rejects_bad_steps(small):
    """Shape, dtype and unknown-sequence errors come back as step errors; the session survives."""
    w = start_worker(small, (0, 6))
    try:
        ch = grpc.insecure_channel(w.addr)
        st = stage_grpc.StageStub(ch)
        setup = stage_pb.SequenceSetup(sampling=stage_pb.SamplingSettings(temperature=0, top_p=1,
                                                                         repetition_penalty=1), prompt_len=3)

        def msgs():
            yield stage_pb.StageMessage(connect=stage_pb.Connect(session_id="t", expect_layer_start=0,
                                                                 expect_layer_end=6))
            # Unknown sequence (no setup).
            yield stage_pb.StageMessage(step=stage_pb.Step(step_id=1, seqs=[stage_pb.SeqWork(
                seq_id=9, token_ids=[1, 2], new_blocks=[0], sample=True)]))
            # Token outside the vocabulary.
            yield stage_pb.StageMessage(step=stage_pb.Step(step_id=2, seqs=[stage_pb.SeqWork(
                seq_id=1, token_ids=[1, 100000], new_blocks=[0], sample=True, setup=setup)]))
            # Block outside the cache.
            yield stage_pb.StageMessage(step=stage_pb.Step(step_id=3, seqs=[stage_pb.SeqWork(
                seq_id=2, token_ids=[1, 2, 3], new_blocks=[99999], sample=True, setup=setup)]))
            # A good step still works.
            yield stage_pb.StageMessage(step=stage_pb.Step(step_id=4, seqs=[stage_pb.SeqWork(
                seq_id=3, token_ids=[5, 6, 7], new_blocks=[0], sample=True, setup=setup)]))

        results = {r.step_id: r for r in st.Run(msgs(), timeout=30)}
        assert results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "unknown" in results[1].error.message
        assert results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "outside the vocabulary" in results[2].error.message
        assert "outside the cache" in results[3].error.message
        assert not results[4].HasField("error") and len(results[4].tokens) == 1
        ch.close()
    finally:
        w.stop()


def test_missing_tensor_fails_worker_start(small, tmp_path):
    """A stage whose checkpoint lacks a tensor exits with the tensor's name."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(small, bad)
    t = load_file(bad / "model.safetensors")
    del t["model.layers.4.mlp.experts.3.up_proj.weight"]
    save_file(t, bad / "model.safetensors")
    with pytest.raises(RuntimeError) as e:
        w = start_worker(bad, (3, 6), wait=False)
        # Loading happens after the listener is up: the process then exits.
        w.p.wait(60)
        raise RuntimeError(w.stderr())
    assert "model.layers.4.mlp.experts.3.up_proj.weight" in str(e.value)


def test_killed_worker_fails_fast(small):
    with cluster(small, stages=2) as (addr, workers, _):
        s, ch = stub(addr)
        errors = []
        started = threading.Event()

        def run():
            try:
                it = s.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[3, 4, 5]), **greedy(3000)),
                                timeout=60)
                for i, _ in enumerate(it):
                    if i == 3:
                        started.set()
            except grpc.RpcError as e:
                errors.append((e.code(), e.details(), time.time()))

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(30)
        killed_at = time.time()
        workers[1].kill()
        t.join(30)
        assert not t.is_alive()
        assert errors and errors[0][0] == grpc.StatusCode.UNAVAILABLE, errors
        assert errors[0][2] - killed_at < 5.0
        ch.close()
