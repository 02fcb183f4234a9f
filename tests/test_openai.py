"""The OpenAI-compatible HTTP API against the real `openai` SDK (and raw HTTP for SSE framing and
malformed bodies): models, chat and completions, streaming with usage, seeds, stop, logprobs, `n`,
tools, every error class, concurrency, cancellation by closing the connection; and DeepSeek's
reasoning and tool calls, driven by a constructed checkpoint, through both APIs."""

import concurrent.futures as cf
import http.client
import json
import socket
import time
from pathlib import Path

import grpc
import pytest

from conftest import FIXTURES, ROOT
from harness import Proc, cluster, generate, model_info, pb, start_router, start_worker, stub, wait_healthy
from test_pipeline import small  # noqa: F401  (fixture)

openai = pytest.importorskip("openai", reason="pip install openai (tests/requirements.txt)")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def scripted():
    import scripted_checkpoint

    out = FIXTURES / "scripted"
    if not (out / ".done").exists():
        template = (ROOT / "crates" / "router" / "src" / "chat_template" / "deepseek_v3.jinja").read_text()
        scripted_checkpoint.build(out, template)
        (out / ".done").write_text("ok")
    return out


@pytest.fixture(scope="module")
def api(small):  # noqa: F811
    """small on one stage; the router serves gRPC and HTTP."""
    with cluster(small, stages=1, kv_blocks=64, router_args=["--http-listen", "127.0.0.1:0"]) as (addr, w, r):
        yield addr, r.http_addr, w


@pytest.fixture(scope="module")
def sapi(scripted):
    with cluster(scripted, stages=2, router_args=["--http-listen", "127.0.0.1:0"]) as (addr, w, r):
        yield addr, r.http_addr


def client(http_addr, key="none"):
    return openai.OpenAI(base_url=f"http://{http_addr}/v1", api_key=key, max_retries=0, timeout=120)


MODEL = "small-f32"


def test_models_and_unknown_model(api):
    _, h, _ = api
    c = client(h)
    ids = [m.id for m in c.models.list().data]
    assert ids == [MODEL]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_chat_text_equals_grpc_for_the_same_request(api):
    addr, h, _ = api
    msgs = [{"role": "user", "content": "Tell me about rivers."}]
    r = client(h).chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0.8, seed=7,
                                          top_p=0.95, presence_penalty=0.1)
    s, ch = stub(addr)
    g = generate(s, messages=[pb.ChatMessage(role="user", content=msgs[0]["content"])],
                 sampling=pb.SamplingParameters(temperature=0.8, seed=7, top_p=0.95, presence_penalty=0.1),
                 stopping=pb.StoppingCriteria(max_new_tokens=12))
    ch.close()
    assert r.choices[0].message.content == g.text
    assert r.usage.completion_tokens == len(g.ids) and r.usage.prompt_tokens == g.usage.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")


def test_n_choices_have_their_own_seed_streams(api):
    _, h, _ = api
    c = client(h)
    kw = dict(model=MODEL, prompt="The river", max_tokens=10, temperature=1.0)
    many = c.completions.create(n=3, seed=11, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    singles = [c.completions.create(seed=11 + i, **kw).choices[0].text for i in range(3)]
    assert [ch.text for ch in many.choices] == singles
    assert len(set(singles)) > 1, "different seeds, different samples"
    assert many.usage.completion_tokens == 30
    with pytest.raises(openai.BadRequestError):
        c.completions.create(n=9, **kw)


def test_streaming_with_usage_and_stop(api):
    _, h, _ = api
    c = client(h)
    full = c.completions.create(model=MODEL, prompt="The river", max_tokens=20, temperature=0).choices[0].text
    chunks = list(c.completions.create(model=MODEL, prompt="The river", max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    stop = full[5:8]
    r = c.completions.create(model=MODEL, prompt="The river", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert full.startswith(r.choices[0].text)
    # Chat streaming: role first, then content deltas.
    ch = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                        temperature=0, stream=True))
    assert ch[0].choices[0].delta.role == "assistant"
    assert ch[-1].choices[0].finish_reason == "length"


def test_logprobs(api):
    _, h, _ = api
    c = client(h)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    r = c.completions.create(model=MODEL, prompt="The river", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs) == 4 and lp.text_offset[0] == 0


def test_logit_bias_forces_a_token(api):
    _, h, _ = api
    c = client(h)
    r = c.completions.create(model=MODEL, prompt="The river", max_tokens=3, temperature=0, logit_bias={"42": 100},
                             logprobs=0)
    assert r.choices[0].logprobs.tokens, r
    s, ch = stub(api[0])
    g = generate(s, prompt="The river", sampling=pb.SamplingParameters(temperature=0, logit_bias={42: 100.0}),
                 stopping=pb.StoppingCriteria(max_new_tokens=3))
    ch.close()
    assert g.ids == [42, 42, 42]


def raw(h, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*h.split(":"), timeout=60)
    conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), 400,
     None),
    (json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400,
     "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                 "tools": TOOLS}).encode(), 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}).encode(),
     400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000}).encode(),
     429, None),
])
def test_error_classes_are_openai_json(api, body, status, param):
    _, h, _ = api
    got, data = raw(h, "POST", "/v1/chat/completions", body)
    assert got == status, data
    err = json.loads(data)["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert raw(h, "GET", "/nope")[0] == 404


def test_raw_sse_framing(api):
    """curl sees server-sent events: `data: {json}` blocks and a final `data: [DONE]`."""
    import subprocess

    _, h, _ = api
    body = json.dumps({"model": MODEL, "prompt": "The river", "max_tokens": 4, "stream": True})
    p = subprocess.run(["curl", "-sN", "-D", "-", f"http://{h}/v1/completions", "-H", "Content-Type: application/json",
                        "-d", body], capture_output=True, timeout=60, check=True)
    head, _, data = p.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head.lower()
    events = data.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {"), e
        json.loads(e[len("data: "):])


def test_concurrent_streams_equal_single_streams(api):
    _, h, _ = api
    c = client(h)
    prompts = [f"River number {i} flows" for i in range(6)]

    def one(p):
        return c.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text

    alone = [one(p) for p in prompts]
    with cf.ThreadPoolExecutor(6) as ex:
        together = list(ex.map(one, prompts))
    assert together == alone


def test_closing_the_connection_cancels_and_frees_blocks(api):
    addr, h, _ = api
    body = json.dumps({"model": MODEL, "prompt": "The river", "max_tokens": 900, "stream": True,
                       "ignore_eos": True}).encode()
    host, port = h.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 3:
        more = sock.recv(4096)
        assert more, got
        got += more
    assert model_info(addr).running_sequences == 1
    sock.close()
    deadline = time.time() + 10
    while True:
        info = model_info(addr)
        if info.running_sequences == 0 and info.kv_blocks_free == info.kv_blocks_total:
            break
        assert time.time() < deadline, info
        time.sleep(0.05)


def test_bearer_auth_and_unavailable(small, tmp_path):  # noqa: F811
    w = start_worker(small, (0, 6))
    r = Proc(["router", "--model", small, "--listen", "127.0.0.1:0", "--stage", w.addr, "--http-listen",
              "127.0.0.1:0"], env={"MLASERVE_AUTH_TOKEN": "sk-test-123"}, role="router")
    try:
        deadline = time.time() + 60
        while raw(r.http_addr, "GET", "/health")[0] != 200:
            assert time.time() < deadline, "router not healthy"
            time.sleep(0.1)
        ok = client(r.http_addr, "sk-test-123").completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert ok.choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            client(r.http_addr, "wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert raw(r.http_addr, "GET", "/health")[0] == 200, "health stays open"
        w.kill()
        deadline = time.time() + 10
        while raw(r.http_addr, "GET", "/health")[0] != 503:
            assert time.time() < deadline
            time.sleep(0.1)
        with pytest.raises(openai.InternalServerError) as e:
            client(r.http_addr, "sk-test-123").completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        r.stop()
        w.stop()


# --- reasoning and tool calls, through both APIs ---------------------------------------------------

def test_reasoning_and_tool_calls_over_http(sapi):
    _, h = sapi
    c = client(h)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, temperature=0)
    m = r.choices[0].message
    assert m.content == "Sure."
    assert m.model_extra["reasoning_content"] == "Let me think"
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = m.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    # Streamed: the same, id and name first, then the arguments.
    reasoning, content, calls, finish = "", "", {}, None
    for ch in c.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, temperature=0, stream=True):
        d = ch.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for t in d.tool_calls or []:
            if t.id:
                assert t.index not in calls and t.function.name
                calls[t.index] = [t.id, t.function.name, ""]
            calls[t.index][2] += t.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == ("Let me think", "Sure.", "tool_calls")
    assert [(n, json.loads(a)) for _, n, a in calls.values()] == [("get_weather", {"city": "Paris"})]
    # tool_choice none: no parsing, the markers stay in the text; inline reasoning stays too.
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, temperature=0, tool_choice="none",
                                  extra_body={"reasoning": "inline"})
    text = r.choices[0].message.content
    assert text.startswith("<think>Let me think</think>Sure.<｜tool▁calls▁begin｜>") and not r.choices[0].message.tool_calls
    # A named function other than the one called: the call is filtered out.
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, temperature=0,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    # The call's result goes back in: a tool turn renders (content null is fine).
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert c.chat.completions.create(model="scripted", messages=follow, tools=TOOLS, max_tokens=3).choices


def test_reasoning_and_tool_calls_over_grpc(sapi):
    addr, _ = sapi
    s, ch = stub(addr)
    tools = [pb.Tool(type="function", function=pb.FunctionDefinition(name="get_weather", parameters_json="{}"))]
    g = generate(s, messages=[pb.ChatMessage(role="user", content="Weather in Paris?")], tools=tools,
                 sampling=pb.SamplingParameters(temperature=0))
    ch.close()
    reasoning = "".join(m.reasoning_text for m in g.messages)
    deltas = [d for m in g.messages for d in m.tool_calls]
    assert reasoning == "Let me think" and g.text == "Sure."
    assert g.finish_reason == "FINISH_REASON_TOOL_CALLS"
    assert deltas[0].id and deltas[0].name == "get_weather"
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'
