"""Chat templates: `mlaserve template` (minijinja) against transformers' `apply_chat_template` (jinja2),
text and token ids, on a small trained byte-level BPE tokenizer that knows every template marker."""

import json
import re
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import ROOT, mlaserve


def deepseek_template() -> str:
    """The template the project embeds (DEEPSEEK_V3_TEMPLATE includes this file)."""
    return (ROOT / "crates" / "router" / "src" / "chat_template" / "deepseek_v3.jinja").read_text()


def tool_turns_with_text(messages):
    """DeepSeek's template reads `content` of tool-call turns, which transformers drops when null:
    both front ends send "" instead (see request.rs), so the comparison does too."""
    return [dict(m, content=m.get("content") or "") if m.get("tool_calls") else m for m in messages]


DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DS_MARKERS = [
    DS_BOS, DS_EOS, "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
]
CHATML_MARKERS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
LLAMA_MARKERS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|python_tag|>",
]

CORPUS = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the weather like in Paris today? It is sunny and 18 degrees.",
    "Call the function get_weather with the city argument, then report the temperature.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Naïve café déjà vu — “quotes” and emoji 🎉 and 日本語 text.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
] * 3


# --- templates written for these tests, in the style of widely used models -------------------------

# ChatML (Qwen-style): tools listed with tojson in the system turn, tool calls as <tool_call> JSON,
# tool results grouped into one user turn, reasoning kept only after the last real user query.
CHATML_TEMPLATE = r"""{#- ChatML with tool use -#}
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if sys is not none %}
        {{- sys.strip() + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nFunction signatures, one per line:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call one, write <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>\n' }}
{%- elif sys is not none %}
    {{- '<|im_start|>system\n' + sys + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages|reverse %}
    {%- if m.role == 'user' and not m.content.startswith('<tool_response>') %}
        {%- set ns.last_query = messages|length - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' }}
        {%- endif %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content if message.content is string else '' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if reasoning and loop.index0 > ns.last_query %}
            {{- '<think>\n' + reasoning.strip() + '\n</think>\n\n' }}
        {%- endif %}
        {{- content }}
        {%- for call in message.tool_calls | default([]) %}
            {%- set fn = call.function if call.function is defined else call %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {%- if fn.arguments is string %}
                {{- fn.arguments }}
            {%- else %}
                {{- fn.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' ~ message.content ~ '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama-3-style: header markers, a dated system block via strftime_now, tools (indented JSON) in
# the first user turn, one tool call per turn, ipython results, role checks via raise_exception.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%Y") %}
{%- endif %}
{%- set tools_in_user_message = tools_in_user_message if tools_in_user_message is defined else true %}
{#- Pull out the system message. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{%- set ns = namespace(users=0, calls=0) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {%- if m.tool_calls is defined %}{% set ns.calls = ns.calls + m.tool_calls | length %}{% endif %}
{%- endfor %}
<|start_header_id|>system<|end_header_id|>

{% if tools is not none %}
Environment: ipython
{% endif %}
Cutting Knowledge Date: December 2023
Today Date: {{ date_string }}
Turns: {{ ns.users }} user, {{ ns.calls }} calls

{{ system_message }}<|eot_id|>
{%- if tools is not none and tools_in_user_message %}
    {%- if messages | selectattr('role', 'equalto', 'user') | list | length == 0 %}
        {{- raise_exception('Tools need a user message to go in!') }}
    {%- endif %}
    {%- set first_user = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
    {{- 'Respond with a JSON function call {"name": name, "parameters": {...}} using:\n\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- '\n\n' }}
    {%- endfor %}
    {{- first_user ~ '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception('Unknown role ' ~ message.role) }}
    {%- endif %}
    {%- if 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception('Only single tool calls are supported.') }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + call.name + '", "parameters": ' }}
        {{- call.arguments | tojson }}
        {{- '}<|eom_id|>' }}
    {%- elif message.role in ['tool', 'ipython'] %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Mistral-style strict alternation plus Python printing of non-string values, whitespace handling of
# blocks and comments without dashes, macros, and filters templates commonly use.
ALTERNATING_TEMPLATE = r"""{{ bos_token }}
{% macro role_tag(role) -%}
[{{ role | upper }}]
{%- endmacro %}
{% for message in messages %}
    {# roles must alternate user/assistant #}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
{{ role_tag('inst') }} {{ message['content'].strip() }} [/INST]
    {% else %}
 {{ message['content'] }}{{ eos_token }}
    {% endif %}
    {% if message.meta is defined %}
meta: {{ message.meta }} | keys: {{ message.meta.keys() | list | join(',') }} | n={{ message.meta | length }}
        {% for k, v in message.meta | dictsort %}
  {{ loop.index }}. {{ k }} = {{ v }}{{ ',' if not loop.last }}
        {% endfor %}
    {% endif %}
{% endfor %}
{% set words = messages | map(attribute='content') | join(' ') %}
words: {{ words.split() | length }}, first: {{ (messages | first)['role'] }}, last: {{ (messages | last).role }}
roles: {{ messages | join('/', attribute='role') }} {{ [1, none, true, 2.5] | join(',') }} {{ 'abc' | join('-') }}
tests: {{ 'x' is sequence }} {{ {} is sequence }} {{ 1 is sequence }} {{ true is number }} {{ 'x' is iterable }} {{ none | string }}
flags: {{ add_generation_prompt }} {{ tools }} {{ none }} {{ 3 / 2 }} {{ 7 // 2 }} {{ 2 ** 10 }} {{ 1.0 }} {{ 10 % 3 }}
{% raw %}{{ not rendered }}{% endraw %}
"""


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=DS_MARKERS + CHATML_MARKERS + LLAMA_MARKERS + ["[INST]", "[/INST]", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer().save(str(path))
    return path


STYLES = {
    "deepseek": (deepseek_template, {"bos_token": {"content": DS_BOS, "__type": "AddedToken"}, "eos_token": DS_EOS}),
    "chatml": (lambda: CHATML_TEMPLATE, {"bos_token": None, "eos_token": "<|im_end|>"}),
    "llama3": (lambda: LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "alternating": (lambda: ALTERNATING_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}),
}


def model_dir(root: Path, tokenizer_json: Path, template: str, tokens: dict) -> Path:
    d = root / f"m{abs(hash(template)) % 10**8}"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "model_max_length": 4096,
           "chat_template": template, **tokens}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    return d


@pytest.fixture(scope="session")
def models_root(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("models")
    return {name: model_dir(root, tokenizer_json, src(), tokens) for name, (src, tokens) in STYLES.items()}


_HF = {}


def hf(model: Path):
    from transformers import AutoTokenizer

    if model not in _HF:
        _HF[model] = AutoTokenizer.from_pretrained(str(model))
    return _HF[model]


def ours(tmp_path: Path, model: Path, messages, tools=None, gen=True, ids=False, check=True):
    mf = tmp_path / "messages.json"
    mf.write_text(json.dumps(messages, ensure_ascii=False))
    args = ["template", "--model", model, "--messages", mf]
    if tools is not None:
        tf = tmp_path / "tools.json"
        tf.write_text(json.dumps(tools, ensure_ascii=False))
        args += ["--tools", tf]
    if not gen:
        args.append("--no-generation-prompt")
    if ids:
        args.append("--ids")
    return mlaserve(*args, check=check, timeout=60)


def compare(tmp_path, model, messages, tools=None):
    """Both add_generation_prompt settings, text and ids. Returns the texts."""
    texts = []
    for gen in (True, False):
        want = hf(model).apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
        got = ours(tmp_path, model, messages, tools, gen).stdout
        assert got == want, f"add_generation_prompt={gen}\n--- ours ---\n{got}\n--- transformers ---\n{want}"
        want_ids = hf(model).apply_chat_template(
            messages, tools=tools, add_generation_prompt=gen, tokenize=True, return_dict=False
        )
        assert json.loads(ours(tmp_path, model, messages, tools, gen, ids=True).stdout) == want_ids
        texts.append(got)
    return texts


# --- conversations ----------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — “quoted” & <escaped?>",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": None},
                "days": {"type": "integer", "minimum": 1, "maximum": 7.5},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": []}}}


def call(i, name, args):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}


SIMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! Naïve café 🎉 日本語?"},
    {"role": "assistant", "content": "Hi there, how can I help?"},
    {"role": "user", "content": "  What is the weather in Paris?  "},
]
TWO_SYSTEMS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "One"},
    {"role": "system", "content": "Also: be kind."},
    {"role": "assistant", "content": "Two"},
    {"role": "user", "content": "Three <｜User｜> literal marker"},
]
ONE_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", '{"city": "Paris"}')]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18, "sky": "sunny"}'},
    {"role": "assistant", "content": "It is sunny and 18 degrees in Paris."},
]
TWO_CALLS = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        call(1, "get_weather", '{"city": "Paris", "unit": "celsius"}'),
        call(2, "get_time", '{"tz": "Europe/Paris"}'),
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]
SECOND_TOOL_TURN = TWO_CALLS + [
    {"role": "assistant", "content": "18C at noon."},
    {"role": "user", "content": "And in Tokyo?"},
    {"role": "assistant", "tool_calls": [call(3, "get_weather", '{"city": "Tokyo"}')]},
    {"role": "tool", "tool_call_id": "call_3", "content": "25C"},
    {"role": "assistant", "content": "25C in Tokyo."},
    {"role": "user", "content": "Thanks"},
]

DEEPSEEK_CASES = {
    "simple": SIMPLE,
    "two_systems": TWO_SYSTEMS,
    "one_call": ONE_CALL,
    "one_call_pending": ONE_CALL[:3],
    "one_call_unanswered": ONE_CALL[:2],
    "two_calls": TWO_CALLS,
    "second_tool_turn": SECOND_TOOL_TURN,
    "only_user": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize("case", sorted(DEEPSEEK_CASES))
def test_deepseek_v3_matches_transformers(models_root, tmp_path, case):
    with_gen, without = compare(tmp_path, models_root["deepseek"], tool_turns_with_text(DEEPSEEK_CASES[case]))
    assert with_gen.startswith(DS_BOS)


def test_deepseek_v3_format_details(models_root, tmp_path):
    """Spot checks of the documented format, independent of transformers."""
    m = models_root["deepseek"]
    text = ours(tmp_path, m, TWO_SYSTEMS).stdout
    assert text == (f"{DS_BOS}You are terse.\n\nAlso: be kind.<｜User｜>One<｜Assistant｜>Two{DS_EOS}"
                    "<｜User｜>Three <｜User｜> literal marker<｜Assistant｜>")
    text = ours(tmp_path, m, tool_turns_with_text(TWO_CALLS)).stdout
    assert text.endswith("<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"), "no generation prompt after tool outputs"
    assert "<｜tool▁output▁end｜><｜tool▁output▁begin｜>12:00" in text
    assert text.count("<｜tool▁calls▁end｜>") == 1
    # The second tool-call turn has no opening markers (upstream's quirk: is_first is never reset).
    text = ours(tmp_path, m, tool_turns_with_text(SECOND_TOOL_TURN)).stdout
    assert "<｜User｜>And in Tokyo?\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather" in text
    ids = json.loads(ours(tmp_path, m, SIMPLE, ids=True).stdout)
    assert ids[0] == hf(m).convert_tokens_to_ids(DS_BOS)


CHATML_CASES = {
    "simple": (SIMPLE, None),
    "tools": (SIMPLE, [WEATHER, TIME]),
    "one_call": (ONE_CALL, [WEATHER]),
    "two_calls": (TWO_CALLS, [WEATHER, TIME]),
    "dict_arguments": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [call(1, "get_weather", {"city": "Paris", "days": 2, "deep": {"a": [1, 2.5, None, True]}})]},
    ], [WEATHER]),
    "reasoning": ([
        {"role": "user", "content": "Think first"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nold answer"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "new answer", "reasoning_content": "  new thoughts  "},
    ], None),
    "system_later": (TWO_SYSTEMS, None),
}


@pytest.mark.parametrize("case", sorted(CHATML_CASES))
def test_chatml_style_matches_transformers(models_root, tmp_path, case):
    messages, tools = CHATML_CASES[case]
    compare(tmp_path, models_root["chatml"], messages, tools)


LLAMA_CASES = {
    "simple": (SIMPLE, None),
    "tools": (SIMPLE, [WEATHER, TIME]),
    "tool_result_dict_and_string": ([
        {"role": "system", "content": "  Be precise.  "},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [call(1, "get_weather", {"city": "Paris", "unit": "celsius"})]},
        {"role": "tool", "content": {"temp": 18.5, "ok": True, "note": None}},
        {"role": "assistant", "tool_calls": [call(2, "get_weather", {"city": "Nice"})]},
        {"role": "tool", "content": "plain string result"},
        {"role": "assistant", "content": "Done."},
    ], [WEATHER]),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama3_style_matches_transformers(models_root, tmp_path, case):
    messages, tools = LLAMA_CASES[case]
    text, _ = compare(tmp_path, models_root["llama3"], messages, tools)
    assert f"Today Date: {time.strftime('%Y')}" in text


def test_python_printing_and_whitespace_match_transformers(models_root, tmp_path):
    messages = [
        {"role": "user", "content": "  first question  ", "meta": {"b": [1, "it's", None], "a": {"x": 1.5e-7},
                                                                    "c": True, "d": 'say "hi"', "e": 1e16}},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]
    compare(tmp_path, models_root["alternating"], messages, [TIME])
    compare(tmp_path, models_root["alternating"], messages[:1], None)


# Single expressions covering the jinja2 features templates use: filters, tests, Python methods,
# loop variables, macros, printing of non-string values. Rendered as one template, one line each.
FEATURE_LINES = [
    "{{ 'a' ~ none ~ true ~ 1.5 }}",
    "{{ m.content[-5:] }}|{{ m.content[::-1] }}|{{ m.content[2:7] }}",
    "{{ m.d.items() | list | tojson }}|{{ m.d | items | list }}",
    "{{ messages[1].content | indent(2) }}|{{ messages[1].content | indent(2, true) }}",
    "{{ \"it's a dog's life\" | title }}|{{ 'hello WORLD' | capitalize }}|{{ m.content | lower | title }}",
    "{{ m.lst | sort | list }}|{{ m.lst | max }}|{{ m.lst | min }}|{{ m.lst | sum }}|{{ m.lst[1:] }}",
    "{{ m.content | replace('l', 'L', 2) }}|{{ m.content.split(',') }}|{{ m.content.strip().lower() }}",
    "{{ m.content | wordcount }}|{{ m.content | truncate(9) }}|{{ m.content | trim | center(30) }}",
    "{{ '%s-%d' | format('a', 3) }}|{{ '{} and {}'.format('a', 'b') }}",
    "{{ messages | map(attribute='role') | list }}|{{ messages | selectattr('role', 'eq', 'user') | map(attribute='n') | first }}",
    "{{ m.missing is defined }}|{{ m.missing }}|{{ m.missing | default('dflt') }}|{{ m.get('zz', 7) }}|{{ m.get('n') }}",
    "{{ m.n * 2 }}|{{ m.f * 2 }}|{{ m.n / 2 }}|{{ 2 ** 0.5 }}|{{ (0.1 + 0.2) | round(2) }}|{{ 2.567 | round(1, 'floor') }}",
    "{{ m.n | string + 'x' }}|{{ m.f | int }}|{{ '3' | int + 1 }}|{{ '2.5' | float }}|{{ 1e20 | int }}",
    "{% for x in messages %}{{ loop.index }}/{{ loop.length }}/{{ loop.revindex }}/{{ loop.first }}/{{ loop.last }}/{{ loop.cycle('a', 'b') }};{% endfor %}",
    "{% for x in messages if x.role == 'assistant' %}{{ x.role }}{% else %}none{% endfor %}",
    "{% for k, v in m.d | dictsort %}{{ k }}={{ v }},{% endfor %}",
    "{{ m | length }}|{{ m.content | length }}|{{ messages | length }}|{{ m.keys() | list }}",
    "{{ m.d }}|{{ m.lst }}|{{ [m.f, 1e100, 1e-10, -0.0, 123456789.0] }}|{{ messages | first }}",
    "{{ dict(a=1, b=none) }}|{{ dict(a=1) | tojson }}|{{ m.d | tojson(indent=2) }}",
    "{% set ns = namespace(x=[]) %}{% set ns.x = ns.x + [1] %}{% set ns.x = ns.x + [2] %}{{ ns.x }}",
    "{{ 'x' if m.n > 2 else 'y' }}|{{ m.n in [1, 2, 3] }}|{{ 'ell' in m.content }}|{{ 'n' in m }}",
    "{{ m.content.startswith(('  H', 'x')) }}|{{ m.content.endswith('me  ') }}|{{ m.content.find('World') }}",
    "{{ messages[1].content.splitlines() }}|{{ '  a  b '.split() }}|{{ 'a,b,,c'.split(',', 1) }}|{{ m.content.count('l') }}",
    "{{ 'Hello'.isupper() }}|{{ '123'.isdigit() }}|{{ 'ab'.upper() }}|{{ '--x--'.strip('-') }}|{{ 'xxa'.lstrip('x') }}",
    "{{ m['d']['a'][1]['c'] }}|{{ m.d.a[1].c is none }}|{{ none is none }}|{{ 0 is false }}|{{ true is true }}",
    "{{ [1, 2] + [3] }}|{{ 'ab' * 3 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 7 / 7 }}",
    "{%- macro greet(name, punct='!') -%}Hi {{ name }}{{ punct }}{%- endmacro -%}{{ greet('a') }} {{ greet('b', punct='?') }}",
    "{% set greeting %}Hello {{ m.role }}{% endset %}{{ greeting | upper }}",
    "{{ range(3) | list }}|{{ range(1, 10, 3) | list }}|{{ messages | batch(1) | list | length }}",
    "{{ [3, 1, 3] | unique | list }}|{{ [1, 2, 3] | reverse | list }}|{{ 'abc' | reverse }}|{{ ['b', 'a'] | sort | join }}",
    "{{ m.lst | map('string') | join('-') }}|{{ [true, none] | map('string') | list }}|{{ [1, none, true] | join(',') }}",
    "{{ 1 == 1.0 }}|{{ 'a' < 'b' }}|{{ [1, 2] == [1, 2] }}|{{ {'a': 1} == {'a': 1} }}",
    "{{ m.content | e }}|{{ '<b>' | escape }}|{{ '<b>' | safe }}|{{ m.content | striptags }}",
    "{{ m.f | abs }}|{{ -3 | abs }}|{{ [1, 2, 3, 4] | slice(2) | list }}|{{ messages | groupby('role') | list | length }}",
    "{{ 'a\\tb\\\\c' | tojson }}|{{ '\\u00e9' }}|{{ '\\x41' }}|{{ messages | tojson }}",
    "{% if messages %}yes{% endif %}{% if [] %}no{% endif %}{% if {} %}no{% endif %}{% if '' %}no{% endif %}{% if 0.0 %}no{% endif %}",
    "{{ m.content is string }}|{{ m.n is integer }}|{{ m.f is float }}|{{ m is mapping }}|{{ messages is sequence }}|{{ 'x' is sequence }}|{{ 'x' is iterable }}|{{ true is number }}",
    "{{ tools }}|{{ documents }}|{{ tools is none }}|{{ tools | tojson }}|{{ add_generation_prompt }}|{{ bos_token }}{{ eos_token }}",
    "{%- for x in messages -%}{%- if loop.index0 == 0 -%}{%- continue -%}{%- endif -%}{{ x.role }}{%- endfor -%}",
    "{% for x in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ x.role }}{% endfor %}",
    "{%- generation -%}{{ m.role }}{%- endgeneration -%}",
]
FEATURE_MESSAGES = [
    {"role": "user", "content": "  Hello World, it's me  ", "n": 3, "f": 2.5, "lst": [3, 1, 2],
     "d": {"b": 1, "a": [1, {"c": None}]}},
    {"role": "assistant", "content": "line1\nline2\n\nline4"},
]


def test_jinja2_features_match_transformers(tmp_path, tokenizer_json):
    template = "{% set m = messages[0] %}" + "".join(f"\n{i:02}: {line}" for i, line in enumerate(FEATURE_LINES))
    m = write_model(tmp_path, tokenizer_json, template)
    want = hf(m).apply_chat_template(FEATURE_MESSAGES, tokenize=False, add_generation_prompt=True)
    got = ours(tmp_path, m, FEATURE_MESSAGES).stdout
    for w, g in zip(want.split("\n"), got.split("\n")):
        assert g == w
    assert got == want


WHITESPACE_CASES = [
    "A\n  {% if true %}\n  B\n  {% endif %}\nC",
    "A\n  {# c #}\n  B\n\t{# c2 #}  \nC",
    "A\n  {%+ if true %}\nB{% endif +%}\nC",
    "A  {% if true %}X{% endif %}  \n  {% for i in [1,2] %}\n{{ i }}\n  {% endfor %}\nD",
    "A\r\n  {% if true %}\r\nB\r\n  {% endif %}\r\nC",
    "x {{- ' y ' -}} z\n  {{ 'w' }}  \n",
    "{% macro m(a) %}\n  <{{ a }}>\n{% endmacro %}\n{{ m(1) }}{{ m(2) }}",
    "{% set y %}\n  inner\n{% endset %}\n[{{ y }}]",
    "trailing newline dropped\n\n",
    "  {%- if true %}  a  {% endif -%}  \n b",
    "{% for m in messages %}\n    {{- m.role }}\n{% endfor %}\n",
]


@pytest.mark.parametrize("case", range(len(WHITESPACE_CASES)))
def test_whitespace_control_matches_transformers(tmp_path, tokenizer_json, case):
    m = write_model(tmp_path, tokenizer_json, WHITESPACE_CASES[case])
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    want = hf(m).apply_chat_template(messages, tokenize=False)
    assert ours(tmp_path, m, messages, gen=False).stdout == want


def test_tool_use_template_is_picked_with_tools(tmp_path, tokenizer_json):
    d = tmp_path / "named"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    templates = [
        {"name": "default", "template": "DEFAULT {{ messages | length }}"},
        {"name": "tool_use", "template": "TOOLS {{ tools | map(attribute='function.name') | join(',') }}"},
    ]
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": templates}))
    messages = [{"role": "user", "content": "x"}]
    compare(tmp_path, d, messages)
    compare(tmp_path, d, messages, [WEATHER, TIME])
    assert ours(tmp_path, d, messages, [WEATHER, TIME]).stdout == "TOOLS get_weather,get_time"


# --- failures ----------------------------------------------------------------------------------------

def test_raise_exception_fails_cleanly(models_root, tmp_path):
    m = models_root["alternating"]
    bad = [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf(m).apply_chat_template(bad, tokenize=False)
    p = ours(tmp_path, m, bad, check=False)
    assert p.returncode != 0
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in p.stderr
    assert p.stdout == ""
    p = ours(tmp_path, models_root["chatml"], [{"role": "narrator", "content": "x"}], check=False)
    assert p.returncode != 0 and "Unexpected role: narrator" in p.stderr


def write_model(tmp_path, tokenizer_json, template):
    return model_dir(tmp_path, tokenizer_json, template, {"bos_token": "<s>", "eos_token": "</s>"})


def test_runaway_template_fails_fast(tmp_path, tokenizer_json):
    forever = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a ~ b }}{% endfor %}{% endfor %}"
    m = write_model(tmp_path, tokenizer_json, forever)
    start = time.monotonic()
    p = ours(tmp_path, m, [{"role": "user", "content": "hi"}], check=False)
    assert p.returncode != 0
    assert "budget" in p.stderr, p.stderr
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("expr", [
    "{{ undefined_var.attr }}",
    "{{ messages[5].content }}",
    "{{ messages[0].content.nonexistent() }}",
    "{{ messages[0].content + 1 }}",
    "{{ raise_exception(123) }}",
    "{{ undefined_var | tojson }}",
])
def test_errors_where_transformers_errors(tmp_path, tokenizer_json, expr):
    m = write_model(tmp_path, tokenizer_json, expr)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception):
        hf(m).apply_chat_template(messages, tokenize=False)
    p = ours(tmp_path, m, messages, check=False)
    assert p.returncode != 0 and p.stdout == "" and "cannot render the chat template" in p.stderr


def test_bad_templates_and_inputs_fail_cleanly(tmp_path, tokenizer_json):
    m = write_model(tmp_path, tokenizer_json, "{% for m in messages %}{{ m.content }")
    p = ours(tmp_path, m, [{"role": "user", "content": "hi"}], check=False)
    assert p.returncode != 0 and "syntax error" in p.stderr and "tokenizer_config.json" in p.stderr

    m = write_model(tmp_path, tokenizer_json, "{{ messages[0].content + 1 }}")
    p = ours(tmp_path, m, [{"role": "user", "content": "hi"}], check=False)
    assert p.returncode != 0 and "render error" in p.stderr

    (m / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    p = ours(tmp_path, m, [{"role": "user", "content": "hi"}], check=False)
    assert p.returncode != 0 and "no chat template" in p.stderr

    mf = tmp_path / "bad.json"
    mf.write_text('{"role": "user"}')
    p = mlaserve("template", "--model", m, "--messages", mf, check=False)
    assert p.returncode != 0 and "JSON array" in p.stderr
