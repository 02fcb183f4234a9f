//! Tool calls in DeepSeek's token format:
//!
//! V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
//! V3.1:  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
//!
//! A call's id and name are emitted as soon as the name is complete, its arguments as they stream.

use super::{hold_back, Event};

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";
const JSON_OPEN: &str = "\n```json\n";
const V3_ARGS_END: &str = "\n```<｜tool▁call▁end｜>";
const MAX_NAME: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Ordinary text.
    Text,
    /// Between calls of a tool-call section.
    Calls,
    /// After CALL_BEGIN, before SEP.
    Head,
    /// V3: after `function<｜tool▁sep｜>`, the name up to the newline and the ```json fence.
    V3Name,
    /// Streaming arguments (V3 fenced, V3.1 plain).
    Args { v3: bool },
}

#[derive(Debug, Clone)]
pub struct ToolCallParser {
    state: State,
    buf: String,
    /// Everything of the current tool-call section not yet shown, to give back as text if malformed.
    raw: String,
    id_prefix: String,
    calls: u32,
}

impl ToolCallParser {
    pub fn new(id_prefix: &str) -> Self {
        ToolCallParser {
            state: State::Text,
            buf: String::new(),
            raw: String::new(),
            id_prefix: id_prefix.to_string(),
            calls: 0,
        }
    }

    /// Completed calls.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<Event> {
        self.buf.push_str(text);
        let mut out = vec![];
        while self.step(&mut out) {}
        out
    }

    /// The end of the output: an unfinished call comes back as text.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = vec![];
        if self.state == State::Text {
            out.push(Event::Content(std::mem::take(&mut self.buf)));
        } else {
            let rest = std::mem::take(&mut self.raw) + &std::mem::take(&mut self.buf);
            out.push(Event::Content(rest));
            self.state = State::Text;
        }
        out
    }

    /// Consumes `n` bytes of the buffer (kept in `raw` while inside a section).
    fn take(&mut self, n: usize) -> String {
        let s: String = self.buf.drain(..n).collect();
        if self.state != State::Text {
            self.raw.push_str(&s);
        }
        s
    }

    /// Gives the section back as text and returns to ordinary text.
    fn malformed(&mut self, out: &mut Vec<Event>) {
        let raw = std::mem::take(&mut self.raw);
        out.push(Event::Content(raw));
        self.state = State::Text;
    }

    /// One transition; false when more text is needed.
    fn step(&mut self, out: &mut Vec<Event>) -> bool {
        match self.state {
            State::Text => {
                if let Some(i) = self.buf.find(CALLS_BEGIN) {
                    let before = self.take(i);
                    out.push(Event::Content(before));
                    self.state = State::Calls;
                    self.take(CALLS_BEGIN.len());
                    return true;
                }
                let keep = hold_back(&self.buf, CALLS_BEGIN).1.len();
                let sure = self.take(self.buf.len() - keep);
                out.push(Event::Content(sure));
                false
            }
            State::Calls => {
                let ws = self.buf.len() - self.buf.trim_start().len();
                if ws > 0 {
                    self.take(ws);
                }
                if self.buf.starts_with(CALL_BEGIN) {
                    self.take(CALL_BEGIN.len());
                    self.state = State::Head;
                    return true;
                }
                if self.buf.starts_with(CALLS_END) {
                    self.take(CALLS_END.len());
                    self.raw.clear();
                    self.state = State::Text;
                    return true;
                }
                if CALL_BEGIN.starts_with(self.buf.as_str()) || CALLS_END.starts_with(self.buf.as_str()) {
                    return false; // undecided (or empty)
                }
                self.malformed(out);
                true
            }
            State::Head => {
                let Some(i) = self.buf.find(SEP) else {
                    if self.buf.len() > MAX_NAME + SEP.len() || self.buf.contains('\n') {
                        self.malformed(out);
                        return true;
                    }
                    return false;
                };
                let head = self.take(i);
                self.take(SEP.len());
                if head == "function" {
                    self.state = State::V3Name;
                } else if valid_name(&head) {
                    self.start(head, out);
                    self.state = State::Args { v3: false };
                } else {
                    self.malformed(out);
                }
                true
            }
            State::V3Name => {
                let Some(i) = self.buf.find('\n') else {
                    if self.buf.len() > MAX_NAME {
                        self.malformed(out);
                        return true;
                    }
                    return false;
                };
                if self.buf.len() < i + JSON_OPEN.len() {
                    if !JSON_OPEN.starts_with(&self.buf[i..]) {
                        self.malformed(out);
                        return true;
                    }
                    return false;
                }
                let name = self.buf[..i].to_string();
                if &self.buf[i..i + JSON_OPEN.len()] != JSON_OPEN || !valid_name(&name) {
                    self.malformed(out);
                    return true;
                }
                self.take(i + JSON_OPEN.len());
                self.start(name, out);
                self.state = State::Args { v3: true };
                true
            }
            State::Args { v3 } => {
                let end = if v3 { V3_ARGS_END } else { CALL_END };
                let index = self.calls;
                if let Some(i) = self.buf.find(end) {
                    let args = self.take(i);
                    self.take(end.len());
                    out.push(Event::ToolCallArguments { index, delta: args });
                    self.calls += 1;
                    self.raw.clear();
                    self.state = State::Calls;
                    return true;
                }
                let keep = hold_back(&self.buf, end).1.len();
                let args = self.take(self.buf.len() - keep);
                // Shown as arguments: no longer given back as text.
                self.raw.clear();
                out.push(Event::ToolCallArguments { index, delta: args });
                false
            }
        }
    }

    fn start(&mut self, name: String, out: &mut Vec<Event>) {
        let index = self.calls;
        out.push(Event::ToolCallStart { index, id: format!("call_{}_{index}", self.id_prefix), name });
        self.raw.clear();
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}
