//! OpenAI response bodies and stream chunks, from the gRPC `GenerateResponse` messages.

use mlaserve_proto::v1::{FinishReason, GenerateResponse, TokenLogprob, Usage};
use serde_json::{json, Value as Json};

use crate::tokenizer::TokenizerInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

pub fn finish_name(f: i32) -> Option<&'static str> {
    match FinishReason::try_from(f).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Unspecified => None,
        FinishReason::Length => Some("length"),
        FinishReason::ToolCalls => Some("tool_calls"),
        FinishReason::Stop | FinishReason::Eos | FinishReason::Cancelled => Some("stop"),
    }
}

pub fn usage_json(u: &[Usage]) -> Json {
    // One prompt, several choices: the prompt counts once, as OpenAI reports it.
    let prompt = u.first().map_or(0, |u| u.prompt_tokens);
    let cached = u.first().map_or(0, |u| u.cached_prompt_tokens);
    let completion: u32 = u.iter().map(|u| u.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn token_json(tok: &TokenizerInfo, id: u32, lp: f32) -> Json {
    let t = tok.token_text(id);
    json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
}

/// Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(tok: &TokenizerInfo, lps: &[TokenLogprob]) -> Json {
    let content: Vec<Json> = lps
        .iter()
        .map(|l| {
            let mut e = token_json(tok, l.token_id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|x| token_json(tok, x.token_id, x.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completion logprobs: parallel arrays, `top_logprobs` as token → logprob maps.
fn completion_logprobs(tok: &TokenizerInfo, lps: &[TokenLogprob], offset: usize) -> Json {
    let mut pos = offset;
    let (mut tokens, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for l in lps {
        let t = tok.token_text(l.token_id);
        offsets.push(pos);
        pos += t.len();
        tokens.push(t);
        values.push(l.logprob);
        let m: serde_json::Map<String, Json> =
            l.top.iter().map(|x| (tok.token_text(x.token_id), json!(x.logprob))).collect();
        tops.push(Json::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
}

/// One choice, assembled from its messages.
#[derive(Default)]
pub struct Choice {
    pub text: String,
    pub reasoning: String,
    /// (id, name, arguments)
    pub calls: Vec<(String, String, String)>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: i32,
    pub usage: Option<Usage>,
    wants_logprobs: bool,
}

impl Choice {
    pub fn new(wants_logprobs: bool) -> Self {
        Choice { wants_logprobs, ..Default::default() }
    }

    pub fn add(&mut self, m: GenerateResponse) {
        self.text.push_str(&m.text);
        self.reasoning.push_str(&m.reasoning_text);
        for d in m.tool_calls {
            match self.calls.get_mut(d.index as usize) {
                Some(c) => c.2.push_str(&d.arguments),
                None => self.calls.push((d.id, d.name, d.arguments)),
            }
        }
        self.logprobs.extend(m.logprobs);
        if m.finish_reason != 0 {
            self.finish = m.finish_reason;
        }
        if m.usage.is_some() {
            self.usage = m.usage;
        }
    }

    pub fn to_json(&self, kind: Kind, index: u32, tok: &TokenizerInfo) -> Json {
        match kind {
            Kind::Chat => {
                let mut msg = json!({"role": "assistant", "content": self.text});
                if !self.reasoning.is_empty() {
                    msg["reasoning_content"] = json!(self.reasoning);
                }
                if !self.calls.is_empty() {
                    msg["tool_calls"] = calls_json(&self.calls);
                    if self.text.is_empty() {
                        msg["content"] = Json::Null;
                    }
                }
                json!({
                    "index": index,
                    "message": msg,
                    "logprobs": self.wants_logprobs.then(|| chat_logprobs(tok, &self.logprobs)),
                    "finish_reason": finish_name(self.finish),
                })
            }
            Kind::Completion => json!({
                "index": index,
                "text": self.text,
                "logprobs": self.wants_logprobs.then(|| completion_logprobs(tok, &self.logprobs, 0)),
                "finish_reason": finish_name(self.finish),
            }),
        }
    }
}

fn calls_json(calls: &[(String, String, String)]) -> Json {
    calls
        .iter()
        .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
        .collect()
}

/// The `choices[0]` entry of a stream chunk for one message; `first` adds the role.
pub fn chunk_choice(
    kind: Kind,
    index: u32,
    m: &GenerateResponse,
    first: bool,
    offset: usize,
    tok: &TokenizerInfo,
    wants_logprobs: bool,
) -> Json {
    let logprobs = (wants_logprobs && !m.logprobs.is_empty()).then(|| match kind {
        Kind::Chat => chat_logprobs(tok, &m.logprobs),
        Kind::Completion => completion_logprobs(tok, &m.logprobs, offset),
    });
    match kind {
        Kind::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if !m.text.is_empty() || (first && m.tool_calls.is_empty() && m.reasoning_text.is_empty()) {
                delta["content"] = json!(m.text);
            }
            if !m.reasoning_text.is_empty() {
                delta["reasoning_content"] = json!(m.reasoning_text);
            }
            if !m.tool_calls.is_empty() {
                delta["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|d| {
                        let mut c = json!({"index": d.index, "function": {"arguments": d.arguments}});
                        if !d.id.is_empty() {
                            c["id"] = json!(d.id);
                            c["type"] = json!("function");
                            c["function"]["name"] = json!(d.name);
                        }
                        c
                    })
                    .collect();
            }
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_name(m.finish_reason)})
        }
        Kind::Completion => {
            json!({"index": index, "text": m.text, "logprobs": logprobs, "finish_reason": finish_name(m.finish_reason)})
        }
    }
}
