//! Rendering tests: DeepSeek's template and the Python-compatible behaviour of the engine.

use super::*;
use serde_json::json;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

fn ds() -> ChatTemplate {
    ChatTemplate::new(DEEPSEEK_V3_TEMPLATE, Some(BOS.into()), Some(EOS.into())).unwrap()
}

fn render(src: &str, messages: &[Json]) -> Result<String, TemplateError> {
    ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()))?.render(messages, None, true)
}

fn eval(src: &str) -> String {
    render(src, &[]).unwrap()
}

fn call(id: &str, name: &str, args: &str) -> Json {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
}

#[test]
fn deepseek_plain_conversation() {
    let msgs = [
        json!({"role": "system", "content": "You are helpful."}),
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Hi"}),
        json!({"role": "assistant", "content": "Hello!"}),
        json!({"role": "user", "content": "2+2?"}),
    ];
    let want =
        format!("{BOS}You are helpful.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}<｜User｜>2+2?");
    assert_eq!(ds().render(&msgs, None, false).unwrap(), want);
    assert_eq!(ds().render(&msgs, None, true).unwrap(), format!("{want}<｜Assistant｜>"));
    // No system message, no bos token.
    let t = ChatTemplate::new(DEEPSEEK_V3_TEMPLATE, None, None).unwrap();
    assert_eq!(t.render(&msgs[2..3], None, true).unwrap(), "<｜User｜>Hi<｜Assistant｜>");
}

#[test]
fn deepseek_tool_calls_and_reasoning_as_upstream_renders_them() {
    let tc = |c: &Json| {
        format!(
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>",
            c["function"]["name"].as_str().unwrap(),
            c["function"]["arguments"].as_str().unwrap()
        )
    };
    let c1 = call("c1", "get_weather", r#"{"city": "Paris"}"#);
    let c2 = call("c2", "get_time", r#"{"tz": "CET"}"#);
    let msgs = [
        json!({"role": "user", "content": "Weather and time?"}),
        json!({"role": "assistant", "content": "", "tool_calls": [c1, c2]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": "18C"}),
        json!({"role": "tool", "tool_call_id": "c2", "content": "12:00"}),
        json!({"role": "assistant", "content": "18C at noon."}),
    ];
    let want = format!(
        "{BOS}<｜User｜>Weather and time?<｜Assistant｜><｜tool▁calls▁begin｜>{}\n{}<｜tool▁calls▁end｜>{EOS}\
         <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\
         <｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>18C at noon.{EOS}",
        tc(&c1),
        tc(&c2),
    );
    // A conversation ending in a tool result gets no generation prompt even when asked.
    assert_eq!(ds().render(&msgs, None, true).unwrap(), format!("{want}<｜Assistant｜>"));
    // An earlier turn's reasoning is stripped (after a user turn; after tool outputs it is kept).
    let chat = [
        json!({"role": "user", "content": "2+2?"}),
        json!({"role": "assistant", "content": "<think>Easy.</think>4"}),
        json!({"role": "user", "content": "3+3?"}),
    ];
    assert_eq!(
        ds().render(&chat, None, true).unwrap(),
        format!("{BOS}<｜User｜>2+2?<｜Assistant｜>4{EOS}<｜User｜>3+3?<｜Assistant｜>")
    );
    assert_eq!(ds().render(&msgs[..4], None, true).unwrap(), want[..want.find("18C at noon").unwrap()]);
    // As in transformers, a null content (dropped before rendering) does not render: the front
    // ends send "" for tool-call turns without content.
    let null = [msgs[0].clone(), json!({"role": "assistant", "content": null, "tool_calls": [c1]})];
    assert!(ds().render(&null, None, false).is_err());
    assert!(ds().uses_reasoning());
}

#[test]
fn key_order_and_python_printing() {
    let msgs =
        [json!({"role": "user", "z": 1, "a": [1, 2.5, "x'y", null, true], "m": {"b": false, "a": 1e20}})];
    let out = render("{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}", &msgs).unwrap();
    assert_eq!(out, "role=user;z=1;a=[1, 2.5, \"x'y\", None, True];m={'b': False, 'a': 1e+20};");
    assert_eq!(
        eval("{{ none }}|{{ true }}|{{ 1.0 }}|{{ 0.1 + 0.2 }}|{{ 1e-5 }}|{{ (1, 'a') }}"),
        "None|True|1.0|0.30000000000000004|1e-05|(1, 'a')"
    );
}

#[test]
fn null_fields_are_dropped_and_reasoning_aliased() {
    let msgs = [json!({"role": "assistant", "content": null, "reasoning": "think", "x": 1})];
    let out = render("{{ messages[0] | tojson }}|{{ messages[0].content is defined }}", &msgs).unwrap();
    assert_eq!(
        out,
        concat!(
            r#"{"thinking": "think", "role": "assistant", "reasoning": "think", "x": 1, "#,
            r#""reasoning_content": "think"}|False"#
        )
    );
    let err = render("x", &[json!("not an object")]).unwrap_err();
    assert!(matches!(err, TemplateError::Render(ref m) if m.contains("JSON objects")), "{err:?}");
}

#[test]
fn tojson_matches_python() {
    // Expected strings from Python's json.dumps with the same arguments.
    // A nested object: top-level nulls of a message are dropped before rendering.
    let msgs =
        [json!({"x": {"b": [1, {"c": "é\"\\\n\u{1}\u{7f}𝄞"}], "a": null, "f": 1.5e-7, "e": [], "d": {}}})];
    let cases = [
        (
            "{{ messages[0].x | tojson }}",
            concat!(
                "{\"b\": [1, {\"c\": \"é\\\"\\\\\\n\\u0001\u{7f}𝄞\"}], ",
                "\"a\": null, \"f\": 1.5e-07, \"e\": [], \"d\": {}}"
            ),
        ),
        (
            "{{ messages[0].x | tojson(ensure_ascii=true) }}",
            concat!(
                r#"{"b": [1, {"c": "\u00e9\"\\\n\u0001\u007f\ud834\udd1e"}], "#,
                r#""a": null, "f": 1.5e-07, "e": [], "d": {}}"#
            ),
        ),
        (
            "{{ messages[0].x | tojson(indent=2, sort_keys=true) }}",
            concat!(
                "{\n  \"a\": null,\n  \"b\": [\n    1,\n    {\n      ",
                "\"c\": \"é\\\"\\\\\\n\\u0001\u{7f}𝄞\"\n    }\n  ],\n  ",
                "\"d\": {},\n  \"e\": [],\n  \"f\": 1.5e-07\n}"
            ),
        ),
        ("{{ [1, 2] | tojson(indent='\t') }}", "[\n\t1,\n\t2\n]"),
        ("{{ {'a': [1, 2]} | tojson(separators=(',', ':')) }}", r#"{"a":[1,2]}"#),
        ("{{ 'x<y>&\\'' | tojson }}", r#""x<y>&'""#),
        ("{{ {1: 2, none: 3, 1.5: 4} | tojson }}", r#"{"1": 2, "null": 3, "1.5": 4}"#),
        ("{{ [1.0, 1e16, 123456789.125, -0.0] | tojson }}", "[1.0, 1e+16, 123456789.125, -0.0]"),
    ];
    for (src, want) in cases {
        assert_eq!(render(src, &msgs).unwrap(), want, "{src}");
    }
    assert!(render("{{ x | tojson }}", &[]).is_err(), "undefined is not serializable");
    assert!(render("{{ 1 | tojson(foo=1) }}", &[]).is_err(), "unknown keyword");
}

#[test]
fn python_float_repr() {
    let cases = [
        (0.0, "0.0"),
        (1.0, "1.0"),
        (-2.5, "-2.5"),
        (0.1, "0.1"),
        (1e-4, "0.0001"),
        (1.5e-5, "1.5e-05"),
        (1e15, "1000000000000000.0"),
        (1e16, "1e+16"),
        (1.2345e100, "1.2345e+100"),
        (123.456, "123.456"),
        (5e-324, "5e-324"),
    ];
    for (f, want) in cases {
        assert_eq!(py_float_repr(f), want, "{f}");
    }
}

#[test]
fn hf_globals_and_python_methods() {
    let msgs = [
        json!({"role": "system", "content": "  sys  "}),
        json!({"role": "user", "content": "a<think>b</think>answer"}),
    ];
    let src = "{{ messages[0].content.strip() }}|{{ messages[1].content.split('</think>')[-1] }}|\
        {{ messages[1].content.startswith('a<') }}|{{ 'x,y'.split(',') | join('+') }}|\
        {{ messages[0].get('missing', 'dflt') }}|{{ bos_token }}{{ eos_token }}|{{ tools is none }}|\
        {{ documents is none }}|{{ add_generation_prompt }}|{{ 'Ab'.upper() }}{{ 'Ab'.lower() }}";
    assert_eq!(render(src, &msgs).unwrap(), "sys|answer|True|x+y|dflt|<s></s>|True|True|True|ABab");

    let year = render("{{ strftime_now('%Y') }}", &[]).unwrap();
    assert_eq!(year, chrono::Local::now().format("%Y").to_string());
    assert!(matches!(render("{{ strftime_now('%Q%') }}", &[]), Err(TemplateError::Render(_))));

    let loops =
        "{% set ns = namespace(n=0) %}{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}\
        {% if i > 4 %}{% break %}{% endif %}{% set ns.n = ns.n + i %}{{ i }}{% endfor %}={{ ns.n }}";
    assert_eq!(eval(loops), "0134=8");
}

#[test]
fn python_semantics_of_builtins() {
    let msgs = [json!({"role": "user", "x": {"y": [5, 6]}}), json!({"role": "assistant", "x": {"y": [7]}})];
    let src = "{{ messages | join('/', attribute='role') }}|\
        {{ messages | join(d='-', attribute='x.y.0') }}|\
        {{ [1, none, true, 2.5] | join(',') }}|{{ 'abc' | join('.') }}|{{ none | string }}|\
        {{ 'x' is sequence }}{{ {} is sequence }}{{ 1 is sequence }}|\
        {{ true is number }}{{ 'x' is number }}";
    assert_eq!(
        render(src, &msgs).unwrap(),
        "user/assistant|5-7|1,None,True,2.5|a.b.c|None|TrueTrueFalse|TrueFalse"
    );
    for huge in [
        "{{ range(1000) | join('x' * 100000) }}",
        "{{ [[[[[1] * 10000] * 100]]] | tojson(indent=200) }}",
        "{{ 1 | tojson(indent=100000000) }}",
        "{{ 'x' | center(100000000000) }}",
    ] {
        assert!(
            matches!(render(huge, &[]), Err(TemplateError::Render(m)) if m.contains("too large")),
            "{huge}"
        );
    }
}

#[test]
fn jinja2_filters_minijinja_lacks() {
    // Expected values from jinja2.
    let msgs = [json!({"content": "  Hello World, it's me  "})];
    let cases = [
        ("{{ messages[0].content | truncate(9) }}", " ..."),
        ("{{ messages[0].content | truncate(9, true) }}", "  Hell..."),
        ("{{ messages[0].content | truncate(9, end='!', leeway=0) }}", "  Hello!"),
        ("{{ messages[0].content | truncate(length=9, killwords=true) }}", "  Hell..."),
        ("{{ messages[0].content | truncate }}", "  Hello World, it's me  "),
        ("{{ messages[0].content | trim | center(30) }}", "     Hello World, it's me     "),
        (
            "[{{ 'ab' | center(5) }}][{{ 'abc' | center(6) }}][{{ 'a' | center(width=4) }}]",
            "[  ab ][ abc  ][ a  ]",
        ),
        ("{{ messages[0].content | wordcount }}|{{ 'snake_case x-y 日本' | wordcount }}", "5|4"),
        (
            "{{ messages[0].content | e }}|{{ '<a href=\"/x\">&</a>' | escape }}",
            "  Hello World, it&#39;s me  |&lt;a href=&#34;/x&#34;&gt;&amp;&lt;/a&gt;",
        ),
        ("{{ '<b>' | safe | e }}|{{ none | e }}", "<b>|None"),
    ];
    for (src, want) in cases {
        assert_eq!(render(src, &msgs).unwrap(), want, "{src}");
    }
}

#[test]
fn trim_and_lstrip_blocks() {
    let src = "A\n  {% if true %}\n  B\n  {% endif %}\n{# comment #}\nC\n";
    // jinja2(trim_blocks, lstrip_blocks) output; the final newline is dropped as in jinja2.
    assert_eq!(eval(src), "A\n  B\nC");
}

#[test]
fn tools_are_passed() {
    let t = ChatTemplate::new("{% for t in tools %}{{ t.function.name }};{% endfor %}", None, None).unwrap();
    let tools = [json!({"type": "function", "function": {"name": "f"}}), json!({"function": {"name": "g"}})];
    assert_eq!(t.render(&[], Some(&tools), false).unwrap(), "f;g;");
    assert_eq!(t.render(&[], None, false).unwrap(), "");
}

#[test]
fn extra_kwargs_reach_the_template() {
    let t = ChatTemplate::new("{{ enable_thinking }}|{{ add_generation_prompt }}", None, None).unwrap();
    let kw = json!({"enable_thinking": false, "add_generation_prompt": "overridden"});
    assert_eq!(t.render_with_kwargs(&[], None, true, kw.as_object()).unwrap(), "False|True");
}

#[test]
fn errors_are_classified() {
    assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(TemplateError::Syntax(_))));
    assert!(matches!(ChatTemplate::new("{{ x ", None, None), Err(TemplateError::Syntax(_))));

    let raised = render(
        "{% if messages[0].role != 'system' %}{{ raise_exception('Roles must alternate!') }}{% endif %}",
        &[json!({"role": "user"})],
    );
    assert_eq!(raised, Err(TemplateError::Raised("Roles must alternate!".into())));
    // Also from inside a macro.
    let raised = render("{% macro m() %}{{ raise_exception('deep') }}{% endmacro %}{{ m() }}", &[]);
    assert_eq!(raised, Err(TemplateError::Raised("deep".into())));

    let start = std::time::Instant::now();
    let forever = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
    assert_eq!(render(forever, &[]), Err(TemplateError::OutOfFuel));
    assert!(start.elapsed().as_secs_f64() < 10.0, "took {:?}", start.elapsed());

    let err = render("{{ messages[0].content + 1 }}", &[json!({"content": "x"})]).unwrap_err();
    assert!(matches!(&err, TemplateError::Render(m) if m.contains("chat_template")), "{err:?}");
    // No filesystem access.
    assert!(matches!(render("{% include 'tokenizer.json' %}", &[]), Err(TemplateError::Render(_))));
}

#[test]
fn many_messages_fit_the_budget() {
    let mut msgs = vec![json!({"role": "system", "content": "s"})];
    for i in 0..5000 {
        msgs.push(json!({"role": "user", "content": format!("question {i}")}));
        msgs.push(json!({"role": "assistant", "content": format!("answer {i}")}));
    }
    let out = ds().render(&msgs, None, true).unwrap();
    assert!(out.ends_with("answer 4999<｜end▁of▁sentence｜><｜Assistant｜>"));
}

#[test]
fn generation_tags_render_their_body() {
    let src =
        "{% for m in messages %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}{% endfor %}";
    assert_eq!(render(src, &[json!({"content": "a"}), json!({"content": "b"})]).unwrap(), "[a][b]");
    assert_eq!(
        rewrite_generation_tags("{%+ generation %}x{% endgeneration +%}"),
        "{%+ if true %}x{% endif +%}"
    );
    assert_eq!(rewrite_generation_tags("{% if generation %}{{ '{%' }}"), "{% if generation %}{{ '{%' }}");
}
