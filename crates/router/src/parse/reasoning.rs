//! `<think>…</think>`: the text inside is reasoning, the rest content.

use super::{hold_back, Event};

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

#[derive(Debug, Clone)]
pub struct ReasoningParser {
    inside: bool,
    /// Text that may be the start of the next marker.
    pending: String,
}

impl ReasoningParser {
    /// `inside`: the prompt already opened `<think>` (R1 and V3.1 thinking mode).
    pub fn new(inside: bool) -> Self {
        ReasoningParser { inside, pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Vec<Event> {
        self.pending.push_str(text);
        let mut out = vec![];
        loop {
            let marker = if self.inside { THINK_CLOSE } else { THINK_OPEN };
            if let Some(i) = self.pending.find(marker) {
                let before = self.pending[..i].to_string();
                out.push(self.event(before));
                self.pending.drain(..i + marker.len());
                self.inside = !self.inside;
                continue;
            }
            let (sure, maybe) = hold_back(&self.pending, marker);
            let (sure, maybe) = (sure.to_string(), maybe.to_string());
            out.push(self.event(sure));
            self.pending = maybe;
            return out;
        }
    }

    /// The end: held-back text is what it looked like.
    pub fn finish_with(&mut self, text: &str) -> Vec<Event> {
        let mut out = self.push(text);
        let rest = std::mem::take(&mut self.pending);
        out.push(self.event(rest));
        out
    }

    fn event(&self, s: String) -> Event {
        if self.inside {
            Event::Reasoning(s)
        } else {
            Event::Content(s)
        }
    }
}

/// Whether a prompt leaves generation inside reasoning: its last think marker opens one.
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    match (prompt.rfind(THINK_OPEN), prompt.rfind(THINK_CLOSE)) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}
