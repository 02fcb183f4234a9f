//! Validation of public requests into what the scheduler runs. Every rejection is INVALID_ARGUMENT
//! (FAILED_PRECONDITION where the model cannot serve the request) with a message naming the field.

use std::time::Instant;

use mlaserve_core::sampling::MAX_TOP_LOGPROBS;
use mlaserve_core::SamplingParams;
use mlaserve_proto::v1::{
    content_part, ChatMessage, GenerateRequest, ReasoningMode, RenderChatRequest, SamplingParameters,
    StoppingCriteria, Tool,
};
use serde_json::{json, Map, Value};
use tonic::Status;

use crate::chat_template::TemplateError;
use crate::options::RouterOptions;
use crate::tokenizer::TokenizerInfo;

/// Facts about the served model the router validates against.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    pub vocab_size: usize,
    /// The model's context (max_position_embeddings).
    pub max_context: usize,
    /// Longest sequence (prompt + generated) the deployment can hold: the context, bounded by the
    /// latent cache pool.
    pub max_total_tokens: usize,
    pub eos_token_ids: Vec<u32>,
}

/// A request ready for the scheduler.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence ids that end generation (empty with `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    pub arrival: Instant,
    pub deadline: Option<Instant>,
    /// How the output is parsed (reasoning, tool calls).
    pub output: OutputSpec,
}

/// What the emitter parses out of the generated text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputSpec {
    /// Reasoning returned apart; `Some(true)` when the prompt already opened `<think>`.
    pub reasoning: Option<bool>,
    /// Tool calls are parsed.
    pub tools: bool,
    /// Only calls of this function are returned (`tool_choice` naming one).
    pub only_tool: Option<String>,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn json_object(field: &str, text: &str) -> Result<Value, Status> {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(invalid(format!("`{field}` must be a JSON object"))),
        Err(e) => Err(invalid(format!("`{field}` is not valid JSON: {e}"))),
    }
}

/// Chat messages as the template sees them (Hugging Face / OpenAI shape).
pub fn messages_json(messages: &[ChatMessage], prefix: &str) -> Result<Vec<Value>, Status> {
    if messages.is_empty() {
        return Err(invalid(format!("`{prefix}` is empty")));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let f = format!("{prefix}[{i}]");
        if !ROLES.contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "`{f}.role` must be one of system, user, assistant, tool (got {:?})",
                m.role
            )));
        }
        if m.content.is_some() && !m.parts.is_empty() {
            return Err(invalid(format!("`{f}`: set either `content` or `parts`, not both")));
        }
        let mut text_parts = Vec::with_capacity(m.parts.len());
        for (j, p) in m.parts.iter().enumerate() {
            match &p.part {
                Some(content_part::Part::Text(t)) => text_parts.push(t.as_str()),
                Some(content_part::Part::Image(_)) => {
                    return Err(invalid(format!("`{f}.parts[{j}]`: only text content is supported")))
                }
                None => return Err(invalid(format!("`{f}.parts[{j}]` is empty"))),
            }
        }
        let content: Option<String> =
            m.content.clone().or_else(|| (!m.parts.is_empty()).then(|| text_parts.concat()));
        if !m.tool_calls.is_empty() && m.role != "assistant" {
            return Err(invalid(format!("`{f}.tool_calls` is only allowed on assistant messages")));
        }
        match m.role.as_str() {
            "assistant" if content.is_none() && m.tool_calls.is_empty() => {
                return Err(invalid(format!("`{f}` needs `content` or `tool_calls`")))
            }
            "system" | "user" | "tool" if content.is_none() => {
                return Err(invalid(format!("`{f}.content` is required for role {}", m.role)))
            }
            _ => {}
        }
        // A tool-call turn without text: "" rather than null. transformers drops null keys, and
        // DeepSeek's own template then fails on `message['content']`; "" renders what it means.
        let content = match content {
            None if !m.tool_calls.is_empty() => Some(String::new()),
            c => c,
        };
        let mut obj = Map::new();
        obj.insert("role".into(), json!(m.role));
        obj.insert("content".into(), content.map(Value::String).unwrap_or(Value::Null));
        if !m.tool_calls.is_empty() {
            let mut calls = Vec::with_capacity(m.tool_calls.len());
            for (j, c) in m.tool_calls.iter().enumerate() {
                let cf = format!("{f}.tool_calls[{j}]");
                if !(c.r#type.is_empty() || c.r#type == "function") {
                    return Err(invalid(format!("`{cf}.type` must be \"function\" (got {:?})", c.r#type)));
                }
                let func =
                    c.function.as_ref().ok_or_else(|| invalid(format!("`{cf}.function` is missing")))?;
                if func.name.trim().is_empty() {
                    return Err(invalid(format!("`{cf}.function.name` is empty")));
                }
                json_object(&format!("{cf}.function.arguments"), &func.arguments)?;
                calls.push(json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": func.name, "arguments": func.arguments},
                }));
            }
            obj.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(id) = &m.tool_call_id {
            obj.insert("tool_call_id".into(), json!(id));
        }
        if let Some(name) = &m.name {
            obj.insert("name".into(), json!(name));
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

pub fn tools_json(tools: &[Tool], prefix: &str) -> Result<Vec<Value>, Status> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = format!("{prefix}[{i}]");
            if !(t.r#type.is_empty() || t.r#type == "function") {
                return Err(invalid(format!("`{f}.type` must be \"function\" (got {:?})", t.r#type)));
            }
            let func = t.function.as_ref().ok_or_else(|| invalid(format!("`{f}.function` is missing")))?;
            if func.name.trim().is_empty() {
                return Err(invalid(format!("`{f}.function.name` is empty")));
            }
            let params = if func.parameters_json.trim().is_empty() {
                json!({"type": "object", "properties": {}})
            } else {
                json_object(&format!("{f}.function.parameters_json"), &func.parameters_json)?
            };
            Ok(json!({
                "type": "function",
                "function": {"name": func.name, "description": func.description, "parameters": params},
            }))
        })
        .collect()
}

fn template_status(e: TemplateError) -> Status {
    match e {
        TemplateError::Raised(m) => invalid(format!("chat template rejected the messages: {m}")),
        TemplateError::OutOfFuel => invalid("chat template exceeded its evaluation budget"),
        other => Status::failed_precondition(format!("chat template failed: {other}")),
    }
}

/// Renders chat input with the model's template; returns the prompt text and its ids.
pub fn render_chat(
    tok: &TokenizerInfo,
    messages: &[ChatMessage],
    tools: &[Tool],
    add_generation_prompt: bool,
    prefix: &str,
) -> Result<(String, Vec<u32>), Status> {
    let _span = tracing::info_span!("template", messages = messages.len()).entered();
    let template = tok.chat_template().ok_or_else(|| {
        Status::failed_precondition("the model has no chat template; send `prompt` or `input_ids`")
    })?;
    let msgs = messages_json(messages, prefix)?;
    let tools = tools_json(tools, "tools")?;
    let text = template
        .render(&msgs, (!tools.is_empty()).then_some(tools.as_slice()), add_generation_prompt)
        .map_err(template_status)?;
    let ids = tok.encode(&text, false).map_err(|e| Status::internal(format!("tokenizer: {e}")))?;
    Ok((text, ids))
}

pub fn render_chat_request(tok: &TokenizerInfo, r: &RenderChatRequest) -> Result<(String, Vec<u32>), Status> {
    render_chat(tok, &r.messages, &r.tools, r.add_generation_prompt.unwrap_or(true), "messages")
}

pub fn sampling_params(
    s: Option<&SamplingParameters>,
    logprobs: bool,
    top_logprobs: u32,
) -> Result<SamplingParams, Status> {
    let d = SamplingParameters::default();
    let s = s.unwrap_or(&d);
    let p = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0),
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        seed: s.seed.unwrap_or_else(rand::random),
        logprobs,
        top_logprobs,
        logit_bias: {
            let mut b: Vec<(u32, f32)> = s.logit_bias.iter().map(|(&t, &v)| (t, v)).collect();
            b.sort_unstable_by_key(|x| x.0);
            b
        },
    };
    p.validate().map_err(|(field, msg)| {
        let prefix = if field == "top_logprobs" { "" } else { "sampling." };
        invalid(format!("`{prefix}{field}` {msg}"))
    })?;
    Ok(p)
}

pub fn validate_generate(
    r: &GenerateRequest,
    tok: &TokenizerInfo,
    limits: &ModelLimits,
    opts: &RouterOptions,
    deadline: Option<Instant>,
) -> Result<ValidRequest, Status> {
    let arrival = Instant::now();
    let request_id = match &r.request_id {
        Some(id) if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) => {
            return Err(invalid("`request_id` must be 1 to 256 printable characters"))
        }
        Some(id) => id.clone(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let given: Vec<&str> = [
        r.prompt.is_some().then_some("prompt"),
        (!r.messages.is_empty()).then_some("messages"),
        r.input_ids.is_some().then_some("input_ids"),
    ]
    .into_iter()
    .flatten()
    .collect();
    match given.len() {
        0 => return Err(invalid("exactly one of `prompt`, `messages`, `input_ids` must be set")),
        1 => {}
        _ => return Err(invalid(format!("only one input may be set, got `{}`", given.join("` and `")))),
    }
    if given[0] != "messages" {
        if !r.tools.is_empty() {
            return Err(invalid("`tools` requires `messages` input"));
        }
        if r.add_generation_prompt.is_some() {
            return Err(invalid("`add_generation_prompt` requires `messages` input"));
        }
    }
    let tool_choice = r.tool_choice.as_deref().unwrap_or("auto");
    if r.tool_choice.is_some() && r.tools.is_empty() {
        return Err(invalid("`tool_choice` requires `tools`"));
    }
    let only_tool = match tool_choice {
        "auto" | "none" => None,
        "required" => {
            return Err(invalid(
                "`tool_choice` \"required\" is not supported; use \"auto\" or a function name",
            ))
        }
        name if r.tools.iter().any(|t| t.function.as_ref().is_some_and(|f| f.name == name)) => {
            Some(name.to_string())
        }
        name => return Err(invalid(format!("`tool_choice` names {name:?}, which is not one of `tools`"))),
    };
    let reasoning_mode = ReasoningMode::try_from(r.reasoning).unwrap_or(ReasoningMode::Unspecified);
    if given[0] != "prompt" && r.add_special_tokens.is_some() {
        return Err(invalid("`add_special_tokens` requires `prompt` input"));
    }
    if r.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(format!(
            "`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {}",
            r.top_logprobs
        )));
    }
    let sampling = sampling_params(r.sampling.as_ref(), r.logprobs, r.top_logprobs)?;
    if let Some(&(t, _)) = sampling.logit_bias.iter().find(|(t, _)| *t as usize >= limits.vocab_size) {
        return Err(invalid(format!(
            "`sampling.logit_bias` names token {t}, outside the vocabulary ({} tokens)",
            limits.vocab_size
        )));
    }

    let d = StoppingCriteria::default();
    let stopping = r.stopping.as_ref().unwrap_or(&d);
    if stopping.stop.len() > opts.max_stop_sequences {
        return Err(invalid(format!(
            "`stopping.stop` has {} strings, at most {} allowed",
            stopping.stop.len(),
            opts.max_stop_sequences
        )));
    }
    for (i, s) in stopping.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(invalid(format!("`stopping.stop[{i}]` is empty")));
        }
        if s.len() > opts.max_stop_length {
            return Err(invalid(format!(
                "`stopping.stop[{i}]` is longer than {} bytes",
                opts.max_stop_length
            )));
        }
    }
    for (i, &t) in stopping.stop_token_ids.iter().enumerate() {
        if t as usize >= limits.vocab_size {
            return Err(invalid(format!(
                "`stopping.stop_token_ids[{i}]` = {t} is outside the vocabulary ({} tokens)",
                limits.vocab_size
            )));
        }
    }
    if let Some(0) = stopping.max_new_tokens {
        return Err(invalid("`stopping.max_new_tokens` must be at least 1"));
    }
    if let Some(m) = stopping.max_new_tokens {
        if m as usize > opts.max_new_tokens {
            return Err(invalid(format!(
                "`stopping.max_new_tokens` must be at most {}, got {m}",
                opts.max_new_tokens
            )));
        }
    }

    let tok_err = |e: crate::tokenizer::TokenizerError| Status::internal(format!("tokenizer: {e}"));
    let tokenize_span = tracing::info_span!("tokenize", input = given[0], tokens = tracing::field::Empty);
    let _entered = tokenize_span.enter();
    let mut prompt_text = String::new();
    let prompt_ids = match given[0] {
        "prompt" => {
            let text = r.prompt.as_deref().unwrap_or_default();
            if text.is_empty() {
                return Err(invalid("`prompt` is empty"));
            }
            prompt_text = text.to_string();
            tok.encode(text, r.add_special_tokens.unwrap_or(true)).map_err(tok_err)?
        }
        "messages" => {
            // tool_choice "none": the model is not told about the tools.
            let tools: &[Tool] = if tool_choice == "none" { &[] } else { &r.tools };
            let (text, ids) =
                render_chat(tok, &r.messages, tools, r.add_generation_prompt.unwrap_or(true), "messages")?;
            prompt_text = text;
            ids
        }
        _ => {
            let ids = &r.input_ids.as_ref().expect("checked above").ids;
            if ids.is_empty() {
                return Err(invalid("`input_ids.ids` is empty"));
            }
            if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= limits.vocab_size) {
                return Err(invalid(format!(
                    "`input_ids.ids[{i}]` = {t} is outside the vocabulary ({} tokens)",
                    limits.vocab_size
                )));
            }
            ids.clone()
        }
    };
    tokenize_span.record("tokens", prompt_ids.len() as i64);
    if prompt_ids.is_empty() {
        return Err(invalid(format!("`{}` is empty after tokenisation", given[0])));
    }
    let n = prompt_ids.len();
    if opts.max_input_tokens > 0 && n > opts.max_input_tokens {
        return Err(invalid(format!(
            "`{}` has {n} tokens, at most {} allowed",
            given[0], opts.max_input_tokens
        )));
    }
    // Beyond the model's context a request is wrong; beyond the cache pool it cannot run here.
    let context = limits.max_context.max(limits.max_total_tokens);
    if n >= context {
        return Err(invalid(format!(
            "`{}` has {n} tokens, which leaves no room in the context of {context} tokens",
            given[0]
        )));
    }
    if let Some(m) = stopping.max_new_tokens.filter(|&m| n + m as usize > context) {
        return Err(invalid(format!(
            "`{}` ({n} tokens) + `stopping.max_new_tokens` ({m}) exceeds the context of {context} tokens",
            given[0]
        )));
    }
    let pool = limits.max_total_tokens;
    let too_big = |what: String| {
        Status::resource_exhausted(format!(
            "{what} exceeds the {pool} tokens the latent cache holds for one sequence (ModelInfo \
             max_total_tokens); shorten the request or give the workers more cache"
        ))
    };
    if n >= pool {
        return Err(too_big(format!("`{}` ({n} tokens)", given[0])));
    }
    let room = pool - n;
    let max_new_tokens = match stopping.max_new_tokens {
        Some(m) if m as usize > room => {
            return Err(too_big(format!("`{}` ({n} tokens) + `stopping.max_new_tokens` ({m})", given[0])))
        }
        Some(m) => m as usize,
        None => opts.default_max_new_tokens.min(room),
    };
    let reasoning = {
        let separate = match reasoning_mode {
            ReasoningMode::Separate => true,
            ReasoningMode::Inline => false,
            ReasoningMode::Unspecified => {
                given[0] == "messages" && tok.chat_template().is_some_and(|t| t.uses_reasoning())
            }
        };
        separate.then(|| {
            if prompt_text.is_empty() {
                prompt_text = tok.decode(&prompt_ids, false).unwrap_or_default();
            }
            crate::parse::reasoning::prompt_opens_reasoning(&prompt_text)
        })
    };
    Ok(ValidRequest {
        request_id,
        prompt_ids,
        sampling,
        max_new_tokens,
        stop: stopping.stop.clone(),
        stop_token_ids: stopping.stop_token_ids.clone(),
        eos_token_ids: if stopping.ignore_eos { vec![] } else { limits.eos_token_ids.clone() },
        arrival,
        deadline,
        output: OutputSpec {
            reasoning,
            tools: given[0] == "messages" && !r.tools.is_empty() && tool_choice != "none",
            only_tool,
        },
    })
}
