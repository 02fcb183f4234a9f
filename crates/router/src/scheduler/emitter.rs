//! The emitter: what a request's stream sees. Appends a step's sampled tokens, detokenises them
//! incrementally, holds back text that may become a stop string, applies the finish rules, and sends
//! one message per step with logprobs, usage and metrics.

use std::time::Instant;

use mlaserve_proto::internal::v1::SampledToken;
use mlaserve_proto::v1::{FinishReason, GenerateResponse, TokenLogprob, ToolCallDelta, TopLogprob, Usage};
use opentelemetry::KeyValue;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use mlaserve_telemetry::genai::{self, RouterMetrics};

use crate::detokenize::IncrementalDetokenizer;
use crate::parse::{Event, OutputParser};
use crate::request::ValidRequest;
use crate::stop::StopMatcher;
use crate::tokenizer::TokenizerInfo;

pub type ResponseTx = mpsc::UnboundedSender<Result<GenerateResponse, Status>>;

/// One request's output side.
pub(super) struct Stream {
    pub req: ValidRequest,
    tx: ResponseTx,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    /// The request's span, and its queue-wait child while waiting for its first admission.
    pub span: tracing::Span,
    pub queue_span: Option<tracing::Span>,
    /// Counted against the queue limit until first admitted.
    pub queued: bool,
    pub first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    parser: OutputParser,
    /// Parsed tool calls: the parser's index → the index returned (None: filtered out).
    calls: Vec<Option<u32>>,
    returned_calls: u32,
}

/// What the sequence looks like to the emitter when a step's tokens arrive.
pub(super) struct EmitContext<'a> {
    pub tok: &'a TokenizerInfo,
    pub metrics: &'a RouterMetrics,
    /// Longest sequence the pipeline holds.
    pub max_total_tokens: usize,
    pub prompt_len: usize,
    /// Tokens of the sequence before this step's (prompt and generated).
    pub len_before: usize,
    pub cached_prompt: usize,
}

/// The tokens taken (those after a finishing one are dropped) and whether the stream is done.
pub(super) struct Emitted {
    pub tokens: Vec<u32>,
    pub finished: bool,
}

impl Stream {
    pub fn new(req: ValidRequest, tx: ResponseTx, span: tracing::Span) -> Self {
        let tail = &req.prompt_ids[req.prompt_ids.len().saturating_sub(8)..];
        let queue_span = tracing::info_span!(parent: &span, "queue");
        Stream {
            detok: IncrementalDetokenizer::new(tail, true),
            stop: StopMatcher::new(req.stop.clone()),
            span,
            queue_span: Some(queue_span),
            queued: true,
            first_scheduled: None,
            first_token: None,
            parser: OutputParser::new(req.output.reasoning, req.output.tools, &id_prefix(&req.request_id)),
            calls: vec![],
            returned_calls: 0,
            req,
            tx,
        }
    }

    /// Why the stream should end now, if it should: the client left or the deadline passed.
    pub fn gone(&self, now: Instant) -> Option<Status> {
        if self.tx.is_closed() {
            return Some(Status::cancelled("client went away"));
        }
        match self.req.deadline {
            Some(d) if now >= d => Some(Status::deadline_exceeded("the request deadline passed")),
            _ => None,
        }
    }

    /// Ends the stream with `status` (sent unless the client is gone).
    pub fn fail(self, status: Status) {
        self.span.record("otel.status_code", "ERROR");
        self.span.record("error.type", format!("{:?}", status.code()));
        tracing::debug!(request_id = %self.req.request_id, "ended: {}", status.message());
        if status.code() != Code::Cancelled {
            let _ = self.tx.send(Err(status));
        }
    }

    /// Streams a step's sampled tokens (two after an accepted draft) as one message.
    pub fn emit(&mut self, cx: &EmitContext, toks: &[&SampledToken], now: Instant) -> Emitted {
        if self.first_token.is_none() {
            self.first_token = Some(now);
            tracing::info!(parent: &self.span, "first_token");
        }
        let tok = cx.tok;
        let mut token_ids = Vec::with_capacity(toks.len());
        let mut logprobs = Vec::new();
        let mut text = String::new();
        let mut finish = None;
        let mut stop_reason = String::new();
        for t in toks {
            let token = t.token_id;
            token_ids.push(token);
            let generated = cx.len_before + token_ids.len() - cx.prompt_len;
            let is_eos = self.req.eos_token_ids.contains(&token);
            let is_stop_token = self.req.stop_token_ids.contains(&token);
            if !is_eos && !is_stop_token {
                match self.detok.push(tok, token) {
                    Ok(delta) => {
                        let out = self.stop.push(&delta);
                        text.push_str(&out.emit);
                        if let Some(s) = out.stopped {
                            finish = Some(FinishReason::Stop);
                            stop_reason = s;
                        }
                    }
                    Err(e) => tracing::warn!(request_id = %self.req.request_id, "detokenisation failed: {e}"),
                }
            }
            if finish.is_none() {
                if is_eos {
                    finish = Some(FinishReason::Eos);
                } else if is_stop_token {
                    finish = Some(FinishReason::Stop);
                    stop_reason = tok.token_text(token);
                } else if generated >= self.req.max_new_tokens
                    || cx.len_before + token_ids.len() >= cx.max_total_tokens
                {
                    finish = Some(FinishReason::Length);
                }
                if finish.is_some() {
                    if let Ok(rest) = self.detok.finish(tok) {
                        text.push_str(&self.stop.push(&rest).emit);
                    }
                    text.push_str(&self.stop.flush());
                }
            }
            if self.req.sampling.wants_logprobs() {
                logprobs.push(TokenLogprob {
                    token_id: token,
                    logprob: t.logprob,
                    top: t
                        .top
                        .iter()
                        .map(|x| TopLogprob {
                            token_id: x.token_id,
                            logprob: x.logprob,
                            text: tok.token_text(x.token_id),
                        })
                        .collect(),
                });
            }
            if finish.is_some() {
                break;
            }
        }
        let (text, reasoning_text, tool_calls) = self.parse(text, finish.is_some());
        if matches!(finish, Some(FinishReason::Eos | FinishReason::Stop)) && self.returned_calls > 0 {
            finish = Some(FinishReason::ToolCalls);
        }
        let generated = cx.len_before + token_ids.len() - cx.prompt_len;
        let usage = finish.map(|_| {
            let secs = |t: Option<Instant>| {
                t.map(|t| t.duration_since(self.req.arrival).as_secs_f64()).unwrap_or(0.0)
            };
            Usage {
                prompt_tokens: cx.prompt_len as u32,
                completion_tokens: generated as u32,
                cached_prompt_tokens: cx.cached_prompt as u32,
                queue_seconds: secs(self.first_scheduled),
                time_to_first_token_seconds: secs(self.first_token),
                total_seconds: now.duration_since(self.req.arrival).as_secs_f64(),
            }
        });
        cx.metrics.generated_tokens.add(token_ids.len() as u64, &cx.metrics.base);
        if let Some(reason) = finish {
            self.record_finish(cx, reason, generated, now);
        }
        let msg = GenerateResponse {
            request_id: self.req.request_id.clone(),
            token_ids: token_ids.clone(),
            text,
            logprobs,
            finish_reason: finish.unwrap_or(FinishReason::Unspecified) as i32,
            usage,
            stop_reason,
            reasoning_text,
            tool_calls,
        };
        let delivered = self.tx.send(Ok(msg)).is_ok();
        Emitted { tokens: token_ids, finished: finish.is_some() || !delivered }
    }

    /// Splits a message's text into content, reasoning and tool-call deltas.
    fn parse(&mut self, text: String, last: bool) -> (String, String, Vec<ToolCallDelta>) {
        if !self.parser.is_active() {
            return (text, String::new(), vec![]);
        }
        let mut events = self.parser.push(&text);
        if last {
            events.extend(self.parser.finish());
        }
        let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), vec![]);
        for ev in events {
            match ev {
                Event::Content(c) => content.push_str(&c),
                Event::Reasoning(r) => reasoning.push_str(&r),
                Event::ToolCallStart { index, id, name } => {
                    debug_assert_eq!(index as usize, self.calls.len());
                    let keep = self.req.output.only_tool.as_ref().is_none_or(|only| *only == name);
                    let out = keep.then(|| {
                        self.returned_calls += 1;
                        self.returned_calls - 1
                    });
                    self.calls.push(out);
                    if let Some(index) = out {
                        calls.push(ToolCallDelta { index, id, name, arguments: String::new() });
                    }
                }
                Event::ToolCallArguments { index, delta } => {
                    if let Some(Some(index)) = self.calls.get(index as usize).copied() {
                        match calls.last_mut() {
                            Some(c) if c.index == index => c.arguments.push_str(&delta),
                            _ => calls.push(ToolCallDelta { index, arguments: delta, ..Default::default() }),
                        }
                    }
                }
            }
        }
        (content, reasoning, calls)
    }

    fn record_finish(&self, cx: &EmitContext, reason: FinishReason, generated: usize, now: Instant) {
        let reason_name = match reason {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::ToolCalls => "tool_calls",
            _ => "cancelled",
        };
        let total = now.duration_since(self.req.arrival).as_secs_f64();
        let ttft =
            self.first_token.map(|t| t.duration_since(self.req.arrival).as_secs_f64()).unwrap_or(total);
        let m = cx.metrics;
        m.ttft.record(ttft, &m.base);
        m.request_duration.record(total, &m.base);
        if generated > 1 {
            m.tpot.record((total - ttft) / (generated - 1) as f64, &m.base);
        }
        let mut attrs = m.base.clone();
        attrs.push(KeyValue::new("finish_reason", reason_name));
        m.requests.add(1, &attrs);
        self.span.record(genai::USAGE_INPUT_TOKENS, cx.prompt_len as i64);
        self.span.record(genai::USAGE_OUTPUT_TOKENS, generated as i64);
        self.span.record(genai::RESPONSE_FINISH_REASONS, format!("[\"{reason_name}\"]"));
    }
}

/// A short, id-safe prefix for tool-call ids, from the request id.
fn id_prefix(request_id: &str) -> String {
    let p: String = request_id.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
    if p.is_empty() {
        "0".into()
    } else {
        p
    }
}
