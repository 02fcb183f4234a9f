"""Metrics endpoint, layered configuration and logs (issue: observability and configuration).
Traces across processes are checked by the Rust test tests/e2e/tests/otlp_traces.rs."""

import json
import re
import subprocess
import urllib.request

import pytest

from conftest import BIN, mlaserve
from harness import Proc, generate, greedy, pb, start_worker, stub, wait_healthy
from test_router import demo  # noqa: F401  (fixture)


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def metric(text, name):
    """Sum of the samples of `name` (any labels)."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            total += float(m.group(2))
            found = True
    assert found, f"{name} not exported:\n" + "\n".join(l for l in text.splitlines() if not l.startswith("#"))[:3000]
    return total


def test_metrics_endpoint_after_requests(demo):  # noqa: F811
    w = start_worker(demo, (0, 4), extra=["--metrics-listen", "127.0.0.1:0"])
    r = Proc(["router", "--model", demo, "--listen", "127.0.0.1:0", "--stage", w.addr,
              "--metrics-listen", "127.0.0.1:0"], role="router")
    try:
        wait_healthy(r.addr)
        s, ch = stub(r.addr)
        for i in range(3):
            generate(s, prompt=f"Request number {i}", **greedy(6))
        ch.close()
        text = scrape(r.metrics_addr)
        assert metric(text, "gen_ai_server_time_to_first_token_seconds_count") == 3
        assert metric(text, "gen_ai_server_time_to_first_token_seconds_sum") > 0
        assert metric(text, "gen_ai_server_time_per_output_token_seconds_count") == 3
        assert metric(text, "gen_ai_server_request_duration_seconds_count") == 3
        assert metric(text, "mlaserve_request_queue_duration_seconds_count") == 3
        assert metric(text, "mlaserve_generation_tokens_total") == 18
        assert metric(text, "mlaserve_prompt_tokens_total") > 0
        assert metric(text, "mlaserve_requests_total") == 3
        assert metric(text, "mlaserve_step_duration_seconds_count") >= 6
        assert metric(text, "mlaserve_kv_blocks_free") > 0
        assert metric(text, "mlaserve_sequences_running") == 0
        # GenAI semantic-convention buckets for TTFT.
        assert 'le="0.001"' in text and 'le="7.5"' in text
        wt = scrape(w.metrics_addr)
        assert metric(wt, "mlaserve_stage_forward_duration_seconds_count") >= 6
        assert metric(wt, "mlaserve_stage_tokens_total") > 0
    finally:
        r.stop()
        w.stop()


def test_stage_traffic_counters(demo):  # noqa: F811
    """A stage that forwards counts exactly hidden_size x 4 bytes (f32) per token it processed, and
    the encoded messages (hidden states plus step framing) on top."""
    hidden = json.loads((demo / "config.json").read_text())["hidden_size"]
    w0 = start_worker(demo, (0, 2), extra=["--metrics-listen", "127.0.0.1:0"])
    w1 = start_worker(demo, (2, 4))
    r = Proc(["router", "--model", demo, "--listen", "127.0.0.1:0", "--stage", w0.addr, "--stage", w1.addr],
             role="router")
    try:
        wait_healthy(r.addr)
        s, ch = stub(r.addr)
        generate(s, input_ids=pb.TokenIds(ids=[5, 6, 7, 8]), **greedy(5))
        ch.close()
        wt = scrape(w0.metrics_addr)
        tokens = metric(wt, "mlaserve_stage_tokens_total")
        assert tokens == 4 + 4  # the prompt, then one token per decode step after the first
        assert metric(wt, "mlaserve_stage_hidden_bytes_total") == tokens * hidden * 4
        assert metric(wt, "mlaserve_stage_sent_bytes_total") > tokens * hidden * 4
    finally:
        for p in (r, w0, w1):
            p.stop()


def config_toml(*args, env=None, check=True):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("MLASERVE_") or k in ("MLASERVE_CACHE",)}
    e.update(env or {})
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=e, check=check)


def test_file_env_flag_precedence(tmp_path):
    cfg = tmp_path / "mlaserve.toml"
    cfg.write_text("[router]\nmax_queue = 11\nmax_running = 12\nmax_batch_tokens = 13\nmodel = \"/m\"\n"
                   "stages = [\"a:1\"]\n")
    env = {"MLASERVE_ROUTER__MAX_RUNNING": "22", "MLASERVE_ROUTER__MAX_BATCH_TOKENS": "23"}
    # The effective configuration, as `mlaserve config` prints it.
    out = config_toml("config", "--config", cfg, env=env).stdout
    assert "max_queue = 11" in out and "max_running = 22" in out and "max_batch_tokens = 23" in out
    # A flag beats both; --check parses everything and starts nothing.
    out = config_toml("router", "--config", cfg, "--max-batch-tokens", "33", "--check", env=env).stdout
    assert "configuration OK" in out
    assert "max_queue = 11" in out and "max_running = 22" in out and "max_batch_tokens = 33" in out


@pytest.mark.parametrize("args,env,key", [
    (["router", "--model", "/m", "--stage", "a:1", "--check"], {"MLASERVE_ROUTER__MAX_QUEUE": "0"}, "router.max_queue"),
    (["router", "--model", "/m", "--stage", "a:1", "--max-running", "0", "--check"], {}, "router.max_running"),
    (["worker", "--model", "/m", "--layers", "5..2", "--check"], {}, "worker.layers"),
    (["worker", "--model", "/m", "--layers", "0..2", "--device", "tpu", "--check"], {}, "worker.device"),
    (["worker", "--layers", "0..2", "--check"], {}, "worker.model"),
    (["router", "--model", "/m", "--check"], {}, "router.stages"),
    (["router", "--model", "/m", "--stage", "a:1", "--log-format", "xml", "--check"], {}, "telemetry.log_format"),
    (["config"], {"MLASERVE_WORKER__KV_BLOCKS": "many"}, "kv_blocks"),
    (["router", "--model", "/m", "--stage", "a:1", "--speculative-min-acceptance", "1.5", "--check"], {},
     "router.speculative_min_acceptance"),
])
def test_bad_values_fail_startup_naming_the_key(args, env, key):
    p = config_toml(*args, env=env, check=False)
    assert p.returncode != 0
    assert key in p.stderr, p.stderr


def test_json_logs_carry_trace_ids(demo, tmp_path):  # noqa: F811
    """With --log-format json and tracing on, log lines inside a request carry its trace id."""
    # A sink that accepts OTLP connections is not needed for logging; point at a closed port.
    w = start_worker(demo, (0, 4))
    r = Proc(["router", "--model", demo, "--listen", "127.0.0.1:0", "--stage", w.addr, "--log-format", "json",
              "--otlp-endpoint", "http://127.0.0.1:9", "--log-level", "info"], role="router")
    try:
        wait_healthy(r.addr)
        s, ch = stub(r.addr)
        trace = "0af7651916cd43dd8448eb211c80319c"
        generate(s, prompt="hi", metadata=[("traceparent", f"00-{trace}-b7ad6b7169203331-01")], **greedy(3))
        ch.close()
    finally:
        r.stop()
        w.stop()
    lines = [json.loads(l) for l in r.stderr_lines if l.startswith("{")]
    assert lines, r.stderr()
    assert all("timestamp" in l and "level" in l for l in lines)
    assert any(l.get("span", {}).get("trace_id") == trace for l in lines), r.stderr()
