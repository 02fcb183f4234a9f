//! Parser tests on DeepSeek's real marker strings: whole, split at every character, and merged.

use super::*;

/// What a client assembles from the events.
#[derive(Debug, Default, PartialEq)]
struct Assembled {
    content: String,
    reasoning: String,
    calls: Vec<(String, String, String)>,
}

fn assemble(events: &[Event]) -> Assembled {
    let mut a = Assembled::default();
    for e in events {
        match e {
            Event::Content(s) => a.content.push_str(s),
            Event::Reasoning(s) => a.reasoning.push_str(s),
            Event::ToolCallStart { index, id, name } => {
                assert_eq!(*index as usize, a.calls.len(), "calls start in order");
                a.calls.push((id.clone(), name.clone(), String::new()));
            }
            Event::ToolCallArguments { index, delta } => a.calls[*index as usize].2.push_str(delta),
        }
    }
    a
}

fn run(parser: &OutputParser, chunks: &[&str]) -> Assembled {
    let mut p = parser.clone();
    let mut events = vec![];
    for c in chunks {
        events.extend(p.push(c));
    }
    events.extend(p.finish());
    assemble(&events)
}

/// Every way of cutting `text` into two pieces, and into single characters, gives `want`.
fn check_all_splits(parser: &OutputParser, text: &str, want: &Assembled) {
    assert_eq!(&run(parser, &[text]), want, "whole");
    for (i, _) in text.char_indices().skip(1) {
        assert_eq!(&run(parser, &[&text[..i], &text[i..]]), want, "split at byte {i}");
    }
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(&run(parser, &refs), want, "one character at a time");
}

const V3_TWO_CALLS: &str = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"CET\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

#[test]
fn v3_tool_calls_at_every_split() {
    let p = OutputParser::new(None, true, "r1");
    let want = Assembled {
        content: "Let me check.".into(),
        reasoning: String::new(),
        calls: vec![
            ("call_r1_0".into(), "get_weather".into(), "{\"city\": \"Paris\"}".into()),
            ("call_r1_1".into(), "get_time".into(), "{\"tz\": \"CET\"}".into()),
        ],
    };
    check_all_splits(&p, V3_TWO_CALLS, &want);
    let mut q = p.clone();
    q.push(V3_TWO_CALLS);
    assert!(q.called_tools());
}

#[test]
fn v31_tool_calls_at_every_split() {
    let p = OutputParser::new(None, true, "x");
    let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{\"q\": \"a\\nb <b>\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let want = Assembled {
        calls: vec![("call_x_0".into(), "search".into(), "{\"q\": \"a\\nb <b>\"}".into())],
        ..Default::default()
    };
    check_all_splits(&p, text, &want);
}

#[test]
fn reasoning_then_content_then_calls() {
    // R1: the prompt opened <think>; the output closes it.
    let p = OutputParser::new(Some(true), true, "r");
    let text = format!("The user wants weather.\n</think>\n\nSure.{V3_TWO_CALLS}");
    let got = run(&p, &[&text]);
    assert_eq!(got.reasoning, "The user wants weather.\n");
    assert_eq!(got.content, "\n\nSure.Let me check.");
    assert_eq!(got.calls.len(), 2);
    check_all_splits(&p, &text, &got);
    // Not opened by the prompt: <think> in the output opens it.
    let p = OutputParser::new(Some(false), false, "r");
    let want = Assembled { content: "Answer: 4".into(), reasoning: "2+2".into(), calls: vec![] };
    check_all_splits(&p, "<think>2+2</think>Answer: 4", &want);
}

#[test]
fn markers_merged_into_one_delta_and_split_across_many() {
    // vLLM #48020: the begin and end markers of a call in one delta must not drop it.
    let p = OutputParser::new(None, true, "m");
    let one =
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let got = run(&p, &[one]);
    assert_eq!(got.calls, vec![("call_m_0".into(), "f".into(), "{}".into())]);
    assert_eq!(got.content, "");
}

#[test]
fn malformed_calls_come_back_as_text() {
    let p = OutputParser::new(None, true, "z");
    for text in [
        // Section with garbage instead of a call.
        "a<｜tool▁calls▁begin｜>oops",
        // Head with a newline (no separator).
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>bad name\nx",
        // V3 without the json fence.
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{}",
        // Unfinished at the end of the output.
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f",
        // Something that only looks like the start of a marker.
        "<｜tool▁calls",
    ] {
        let got = run(&p, &[text]);
        assert!(got.calls.is_empty(), "{text:?}: {got:?}");
        assert_eq!(got.content, text, "{text:?}");
        check_all_splits(&p, text, &got);
    }
}

#[test]
fn parsing_off_passes_everything_through() {
    let p = OutputParser::new(None, false, "z");
    assert!(!p.is_active());
    let got = run(&p, &[V3_TWO_CALLS, "<think>x</think>"]);
    assert_eq!(got.content, format!("{V3_TWO_CALLS}<think>x</think>"));
}

#[test]
fn prompts_that_open_reasoning() {
    use reasoning::prompt_opens_reasoning;
    assert!(prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n"));
    assert!(!prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜></think>"));
    assert!(!prompt_opens_reasoning("<think>a</think><｜User｜>hi<｜Assistant｜>"));
    assert!(!prompt_opens_reasoning("plain"));
}

#[test]
fn hold_back_keeps_only_marker_prefixes() {
    assert_eq!(hold_back("abc<thi", "<think>"), ("abc", "<thi"));
    assert_eq!(hold_back("abc<x", "<think>"), ("abc<x", ""));
    assert_eq!(hold_back("é<｜tool", CALLS), ("é", "<｜tool"));
}

const CALLS: &str = tool_calls::CALLS_BEGIN;
