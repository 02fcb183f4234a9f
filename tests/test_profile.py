"""`MLASERVE_PROFILE=1` on `mlaserve generate`: the per-section table, and the `replay` section (a
decode step's weight bytes read again after each later decode step) without changing any token."""
import json
import os
import re

from conftest import generate_json, ids_arg, mlaserve

# crates/model/src/profile.rs: the step after REPLAY_AFTER decode steps is recorded, the later ones
# are each followed by one replay.
REPLAY_AFTER = 8


def profiled(model, ids, new, *extra):
    env = {**os.environ, "MLASERVE_PROFILE": "1"}
    p = mlaserve("generate", "--model", model, "--max-new-tokens", new, "--json", "--stats", "--ids",
                 ids_arg(ids), *extra, env=env)
    out = json.loads(p.stdout.strip().splitlines()[0])["ids"]
    # The table and then the stats line go to stderr.
    stats = json.loads([ln for ln in p.stderr.splitlines() if ln.startswith("{")][-1])
    table = {}
    for ln in p.stderr.splitlines():
        m = re.match(r"^([a-z_.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)$", ln.strip())
        if m:
            table[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    return stats, out, table


def test_profile_replays_each_decode_step_after_the_recorded_one(tiny):
    ids = [5, 9, 17, 33, 2, 41]
    for extra in [(), ("--dtype", "bf16")]:
        stats, out, table = profiled(tiny, ids, 24, *extra)
        assert out == generate_json(tiny, [ids], 24, *extra)[0], "profiling changes no token"
        steps = stats["decode_steps"]
        assert steps == 23
        assert "lm_head" in table and "attention" in table, table
        ms, calls = table["replay"]
        assert calls == steps - REPLAY_AFTER - 1, (calls, steps)
        assert ms > 0
        # Too few decode steps to reach the recorded one: no replay at all.
        _, _, short = profiled(tiny, ids, REPLAY_AFTER, *extra)
        assert "replay" not in short, short
