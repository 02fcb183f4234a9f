"""The public Generate API end to end: router + worker processes on loopback, Python grpcio client."""

import json
import shutil
import threading
import time

import grpc
import pytest
import torch

import ds3_reference
from conftest import mlaserve, reference
from harness import cluster, generate, greedy, model_info, pb, stub
from test_pipeline import small, small_cases  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def demo():
    """The demo model (random weights, trained tokenizer, DeepSeek-V3 chat template)."""
    from pathlib import Path

    return Path(mlaserve("demo-model").stdout.strip())


@pytest.fixture(scope="module")
def small2(small):  # noqa: F811
    with cluster(small, stages=2) as c:
        yield c[0]


@pytest.fixture(scope="module")
def demo1(demo):
    with cluster(demo, stages=1) as c:
        yield c[0]


def test_greedy_equals_transformers_through_two_stages(small2, small_cases):  # noqa: F811
    s, ch = stub(small2)
    for ids, ref in small_cases:
        r = generate(s, input_ids=pb.TokenIds(ids=ids), **greedy(16))
        assert r.ids == ref
        assert r.finish_reason == "FINISH_REASON_LENGTH"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 16
    ch.close()


def test_32_concurrent_streams_equal_their_single_results(small2):
    s, ch = stub(small2)
    g = torch.Generator().manual_seed(5)
    reqs = []
    for i in range(32):
        ids = torch.randint(2, 512, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        if i % 2:
            sampling = pb.SamplingParameters(temperature=0.0)
        else:  # seeded sampling must not depend on batch composition either
            sampling = pb.SamplingParameters(temperature=0.8, top_p=0.9, top_k=50, seed=1000 + i)
        reqs.append(dict(input_ids=pb.TokenIds(ids=ids), sampling=sampling,
                         stopping=pb.StoppingCriteria(max_new_tokens=12 + i % 5, ignore_eos=True)))
    alone = [generate(s, **r).ids for r in reqs]
    together = [None] * len(reqs)

    def run(i):
        together[i] = generate(s, **reqs[i]).ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    ch.close()


def test_logprobs_match_the_reference_distribution(small, small2):  # noqa: F811
    s, ch = stub(small2)
    ids = [5, 17, 99, 3]
    r = generate(s, input_ids=pb.TokenIds(ids=ids), logprobs=True, top_logprobs=3, **greedy(6))
    assert len(r.logprobs) == 6 and len(r.ids) == 6
    model, mtp = reference(small)
    ref = ds3_reference.logits(model, mtp, ids + r.ids)["logits"].log_softmax(-1)
    for k, lp in enumerate(r.logprobs):
        row = ref[len(ids) - 1 + k]
        assert lp.token_id == r.ids[k]
        assert abs(lp.logprob - row[r.ids[k]].item()) < 1e-3
        assert [t.token_id for t in lp.top] == row.topk(3).indices.tolist()
        assert all(abs(t.logprob - row[t.token_id].item()) < 1e-3 for t in lp.top)
    ch.close()


def test_seeds_repeat(small2):
    s, ch = stub(small2)
    base = dict(input_ids=pb.TokenIds(ids=[7, 8, 9]), stopping=pb.StoppingCriteria(max_new_tokens=20, ignore_eos=True))
    a = generate(s, sampling=pb.SamplingParameters(temperature=1.0, seed=42), **base).ids
    b = generate(s, sampling=pb.SamplingParameters(temperature=1.0, seed=42), **base).ids
    c = generate(s, sampling=pb.SamplingParameters(temperature=1.0, seed=43), **base).ids
    assert a == b
    assert a != c
    ch.close()


def test_max_tokens_and_stop_token_ids(small2):
    s, ch = stub(small2)
    r = generate(s, input_ids=pb.TokenIds(ids=[4, 5, 6]), **greedy(9))
    assert len(r.ids) == 9 and r.finish_reason == "FINISH_REASON_LENGTH"
    stop_at = r.ids[4]
    first = r.ids.index(stop_at)
    r2 = generate(s, input_ids=pb.TokenIds(ids=[4, 5, 6]), **greedy(9, stop_token_ids=[stop_at]))
    assert r2.ids == r.ids[:first + 1] and r2.finish_reason == "FINISH_REASON_STOP"
    ch.close()


def test_eos_ends_generation(small, tmp_path):  # noqa: F811
    """A model whose EOS is the 4th greedy token stops there with finish_reason EOS (unless ignore_eos)."""
    with cluster(small, stages=1) as (addr, _, _):
        s, ch = stub(addr)
        base = generate(s, input_ids=pb.TokenIds(ids=[9, 10, 11]), **greedy(8)).ids
        assert len(base) == 8
        ch.close()
    eos = base[3]
    first = base.index(eos)
    m = tmp_path / "eosmodel"
    shutil.copytree(small, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (m / "config.json").write_text(json.dumps(cfg))
    with cluster(m, stages=1) as (addr, _, _):
        s, ch = stub(addr)
        r = generate(s, input_ids=pb.TokenIds(ids=[9, 10, 11]), **greedy(8, ignore_eos=False))
        assert r.ids == base[:first + 1] and r.finish_reason == "FINISH_REASON_EOS"
        r = generate(s, input_ids=pb.TokenIds(ids=[9, 10, 11]), **greedy(8, ignore_eos=True))
        assert r.ids == base and r.finish_reason == "FINISH_REASON_LENGTH"
        ch.close()


def test_stop_strings_span_tokens_and_are_not_emitted(demo1):
    s, ch = stub(demo1)
    base = generate(s, prompt="The river", **greedy(40))
    assert base.text and len(base.ids) == 40
    text = base.text
    # A stop string from the middle of the output, long enough to span several tokens.
    mid = len(text) // 2
    stop = text[mid:mid + 6]
    assert stop.strip(), text
    r = generate(s, prompt="The river", **greedy(40, stop=[stop]))
    assert r.finish_reason == "FINISH_REASON_STOP" and r.stop_reason == stop
    assert r.text == text[:text.index(stop)]
    assert stop not in r.text
    ch.close()


def test_streamed_text_is_the_decoded_ids(demo, demo1):
    """Concatenated deltas equal the tokenizer's decoding of all generated ids (no broken characters)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo / "tokenizer.json"))
    s, ch = stub(demo1)
    for seed in range(3):
        r = generate(s, prompt="Café 中文 🙂", sampling=pb.SamplingParameters(temperature=1.0, seed=seed),
                     stopping=pb.StoppingCriteria(max_new_tokens=48, ignore_eos=True))
        assert r.text == tok.decode(r.ids, skip_special_tokens=True)
        for m in r.messages:
            m.text.encode("utf-8")  # every delta is valid UTF-8 on its own
            assert "\ufffd" not in m.text or "\ufffd" in tok.decode(r.ids)
    ch.close()


def test_chat_input_tokenize_detokenize_render(demo, demo1):
    s, ch = stub(demo1)
    msgs = [pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hello!")]
    rendered = s.RenderChat(pb.RenderChatRequest(messages=msgs), timeout=10)
    assert "<｜User｜>Hello!" in rendered.prompt and rendered.prompt.endswith("<｜Assistant｜>")
    assert rendered.prompt.startswith("<｜begin▁of▁sentence｜>Be brief.")
    t = s.Tokenize(pb.TokenizeRequest(text=rendered.prompt, add_special_tokens=False), timeout=10)
    assert list(t.ids) == list(rendered.ids) and len(t.tokens) == len(t.ids)
    d = s.Detokenize(pb.DetokenizeRequest(ids=t.ids), timeout=10)
    assert d.text == rendered.prompt
    r = generate(s, messages=msgs, **greedy(5))
    assert r.usage.prompt_tokens == len(rendered.ids)
    ch.close()


def test_cancellation_frees_blocks(small2):
    s, ch = stub(small2)
    total = model_info(small2).kv_blocks_total
    calls = []
    for i in range(8):
        call = s.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[3 + i] * (20 + i)),
                                             **greedy(3000)), timeout=60)
        calls.append(call)
    for c in calls:
        next(c)  # first token arrived: it holds blocks on every stage
    info = model_info(small2)
    assert info.running_sequences == 8 and info.kv_blocks_free < total
    for c in calls:
        c.cancel()
    deadline = time.time() + 5
    while time.time() < deadline:
        info = model_info(small2)
        if info.kv_blocks_free == total and info.running_sequences == 0:
            break
        time.sleep(0.05)
    assert (info.kv_blocks_free, info.running_sequences, info.waiting_sequences) == (total, 0, 0)
    ch.close()


def test_deadline_frees_blocks(small2):
    s, ch = stub(small2)
    total = model_info(small2).kv_blocks_total
    with pytest.raises(grpc.RpcError) as e:
        generate(s, timeout=1.0, input_ids=pb.TokenIds(ids=[3, 4]), **greedy(4000))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 5
    while time.time() < deadline and model_info(small2).kv_blocks_free != total:
        time.sleep(0.05)
    assert model_info(small2).kv_blocks_free == total
    ch.close()


def _invalid_requests():
    ids = pb.TokenIds(ids=[1, 2])
    sp = pb.SamplingParameters
    st = pb.StoppingCriteria
    return [
        ("no input", dict(), "exactly one of"),
        ("two inputs", dict(prompt="hi", input_ids=ids), "only one input"),
        ("empty prompt", dict(prompt=""), "`prompt` is empty"),
        ("empty ids", dict(input_ids=pb.TokenIds(ids=[])), "`input_ids.ids` is empty"),
        ("id outside vocab", dict(input_ids=pb.TokenIds(ids=[1, 10 ** 6])), "`input_ids.ids[1]`"),
        ("temperature", dict(input_ids=ids, sampling=sp(temperature=-0.5)), "`sampling.temperature`"),
        ("top_p", dict(input_ids=ids, sampling=sp(top_p=1.5)), "`sampling.top_p`"),
        ("min_p", dict(input_ids=ids, sampling=sp(min_p=-1)), "`sampling.min_p`"),
        ("repetition", dict(input_ids=ids, sampling=sp(repetition_penalty=0)), "`sampling.repetition_penalty`"),
        ("frequency", dict(input_ids=ids, sampling=sp(frequency_penalty=5)), "`sampling.frequency_penalty`"),
        ("presence", dict(input_ids=ids, sampling=sp(presence_penalty=-5)), "`sampling.presence_penalty`"),
        ("top_logprobs", dict(input_ids=ids, top_logprobs=50), "`top_logprobs`"),
        ("max_new 0", dict(input_ids=ids, stopping=st(max_new_tokens=0)), "`stopping.max_new_tokens`"),
        ("max_new huge", dict(input_ids=ids, stopping=st(max_new_tokens=10 ** 7)), "`stopping.max_new_tokens`"),
        ("empty stop", dict(input_ids=ids, stopping=st(stop=["a", ""])), "`stopping.stop[1]`"),
        ("too many stops", dict(input_ids=ids, stopping=st(stop=[str(i) for i in range(50)])), "`stopping.stop`"),
        ("stop token id", dict(input_ids=ids, stopping=st(stop_token_ids=[10 ** 6])), "`stopping.stop_token_ids[0]`"),
        ("bad role", dict(messages=[pb.ChatMessage(role="bot", content="x")]), "`messages[0].role`"),
        ("tools without chat", dict(input_ids=ids, tools=[pb.Tool(function=pb.FunctionDefinition(name="f"))]),
         "`tools`"),
        ("bad tool args", dict(messages=[pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(
            function=pb.FunctionCall(name="f", arguments="{not json"))])]), "`messages[0].tool_calls[0].function.arguments`"),
        ("image part", dict(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(image=b"x")])]),
         "`messages[0].parts[0]`"),
        ("user without content", dict(messages=[pb.ChatMessage(role="user")]), "`messages[0].content`"),
    ]


@pytest.mark.parametrize("name,fields,needle", _invalid_requests(), ids=[c[0] for c in _invalid_requests()])
def test_invalid_requests_name_the_field(small2, name, fields, needle):
    s, ch = stub(small2)
    with pytest.raises(grpc.RpcError) as e:
        generate(s, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value.details())
    assert needle in e.value.details(), (name, e.value.details())
    # The router keeps serving.
    assert generate(s, input_ids=pb.TokenIds(ids=[1, 2]), **greedy(2)).finish_reason
    ch.close()


def test_prompt_longer_than_the_context(small2):
    """Beyond the model's context a request is invalid; within it but beyond what the latent cache
    pool holds for one sequence it is RESOURCE_EXHAUSTED, naming the limit."""
    s, ch = stub(small2)
    info = model_info(small2)
    assert info.kv_capacity_tokens == info.kv_blocks_total * info.block_size
    assert info.max_total_tokens == min(info.max_position_embeddings, info.kv_capacity_tokens)
    with pytest.raises(grpc.RpcError) as e:
        generate(s, input_ids=pb.TokenIds(ids=[5] * (info.max_position_embeddings + 1)), **greedy(1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.details()
    if info.max_total_tokens < info.max_position_embeddings:
        for ids, new in [([5] * info.max_total_tokens, 1), ([5] * 4, info.max_total_tokens)]:
            with pytest.raises(grpc.RpcError) as e:
                generate(s, input_ids=pb.TokenIds(ids=ids), **greedy(new))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
            assert f"{info.max_total_tokens} tokens" in e.value.details()
        # Unset max_new_tokens is capped to what fits.
        r = generate(s, input_ids=pb.TokenIds(ids=[5] * (info.max_total_tokens - 2)))
        assert r.usage.completion_tokens <= 2
    ch.close()


def test_prefix_cache_skips_shared_prefill_and_changes_nothing(small):  # noqa: F811
    """A second request sharing a long prefix reuses its cached blocks (reported in usage and
    ModelInfo) and generates exactly what it generates without prefix caching."""
    g = torch.Generator().manual_seed(11)
    system = torch.randint(2, 512, (70,), generator=g).tolist()
    tails = [torch.randint(2, 512, (5,), generator=g).tolist() for _ in range(3)]
    results = {}
    for caching in ("true", "false"):
        with cluster(small, stages=2, router_args=["--prefix-caching", caching]) as (addr, _, _):
            s, ch = stub(addr)
            runs = [generate(s, input_ids=pb.TokenIds(ids=system + t), **greedy(10)) for t in tails]
            # Sampled with penalties too: the stages then need the skipped tokens as history.
            runs.append(generate(s, input_ids=pb.TokenIds(ids=system + tails[0]),
                                 sampling=pb.SamplingParameters(temperature=0.9, seed=5, repetition_penalty=1.3),
                                 stopping=pb.StoppingCriteria(max_new_tokens=10, ignore_eos=True)))
            results[caching] = ([r.ids for r in runs], [r.usage.cached_prompt_tokens for r in runs], model_info(addr))
            ch.close()
    ids_on, cached_on, info_on = results["true"]
    ids_off, cached_off, info_off = results["false"]
    assert ids_on == ids_off
    assert cached_off == [0, 0, 0, 0]
    block = info_on.block_size
    assert cached_on[0] == 0 and all(c == (70 // block) * block for c in cached_on[1:]), cached_on
    assert info_on.prefix_cache_hits >= 3 * (70 // block) and info_on.prefix_cache_queries >= info_on.prefix_cache_hits
    assert info_off.prefix_cache_hits == 0
    assert info_on.kv_blocks_free == info_on.kv_blocks_total, "cached blocks count as free"
