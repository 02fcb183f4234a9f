//! DeepSeek output parsing on the streamed text: reasoning (`<think>…</think>`) and tool calls in
//! DeepSeek-V3/R1's and V3.1's token formats, incrementally, so that each message carries its share
//! of content, reasoning and tool-call deltas. Both front ends (gRPC and the OpenAI HTTP API) get
//! the same events. Markers may arrive several in one delta or split across deltas; text that only
//! might be the start of a marker is held back until it is decided. A malformed call comes back as
//! content, never as an error.

pub mod reasoning;
pub mod tool_calls;

#[cfg(test)]
mod tests;

pub use reasoning::ReasoningParser;
pub use tool_calls::ToolCallParser;

/// What a piece of output is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Content(String),
    Reasoning(String),
    /// A tool call begins: its index in this response, a generated id, and the function name.
    ToolCallStart {
        index: u32,
        id: String,
        name: String,
    },
    /// More of a tool call's JSON arguments.
    ToolCallArguments {
        index: u32,
        delta: String,
    },
}

/// The parsers one request uses.
#[derive(Debug, Clone, Default)]
pub struct OutputParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
}

impl OutputParser {
    /// `reasoning`: split reasoning off (starting inside it when the prompt opened `<think>`);
    /// `tools`: parse tool calls, ids prefixed with `id_prefix`.
    pub fn new(reasoning: Option<bool>, tools: bool, id_prefix: &str) -> Self {
        OutputParser {
            reasoning: reasoning.map(ReasoningParser::new),
            tools: tools.then(|| ToolCallParser::new(id_prefix)),
        }
    }

    pub fn is_active(&self) -> bool {
        self.reasoning.is_some() || self.tools.is_some()
    }

    /// Whether a tool call was completed (the finish reason becomes "tool_calls").
    pub fn called_tools(&self) -> bool {
        self.tools.as_ref().is_some_and(|t| t.calls() > 0)
    }

    pub fn push(&mut self, text: &str) -> Vec<Event> {
        self.run(text, false)
    }

    /// The output ended: whatever was held back.
    pub fn finish(&mut self) -> Vec<Event> {
        self.run("", true)
    }

    fn run(&mut self, text: &str, end: bool) -> Vec<Event> {
        let first = match &mut self.reasoning {
            Some(r) if end => r.finish_with(text),
            Some(r) => r.push(text),
            None => vec![Event::Content(text.to_string())],
        };
        let Some(tools) = &mut self.tools else { return merge(first) };
        let mut out = vec![];
        for ev in first {
            match ev {
                Event::Content(c) => out.extend(tools.push(&c)),
                other => out.push(other),
            }
        }
        if end {
            out.extend(tools.finish());
        }
        merge(out)
    }
}

/// Joins neighbouring text events of one kind and drops empty ones.
fn merge(events: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(events.len());
    for ev in events {
        match (out.last_mut(), ev) {
            (_, Event::Content(s) | Event::Reasoning(s)) if s.is_empty() => {}
            (Some(Event::Content(a)), Event::Content(b)) => a.push_str(&b),
            (Some(Event::Reasoning(a)), Event::Reasoning(b)) => a.push_str(&b),
            (
                Some(Event::ToolCallArguments { index: i, delta: a }),
                Event::ToolCallArguments { index: j, delta: b },
            ) if *i == j => a.push_str(&b),
            (_, Event::ToolCallArguments { delta, .. }) if delta.is_empty() => {}
            (_, ev) => out.push(ev),
        }
    }
    out
}

/// Splits `buf` into what is certainly not the start of `marker` and a tail that might be.
pub(crate) fn hold_back<'a>(buf: &'a str, marker: &str) -> (&'a str, &'a str) {
    let max = marker.len().saturating_sub(1).min(buf.len());
    for k in (1..=max).rev() {
        let cut = buf.len() - k;
        if buf.is_char_boundary(cut) && marker.starts_with(&buf[cut..]) {
            return (&buf[..cut], &buf[cut..]);
        }
    }
    (buf, "")
}
