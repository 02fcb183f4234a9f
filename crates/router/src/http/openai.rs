//! OpenAI request bodies, and their conversion into the gRPC `GenerateRequest` (so that both front
//! ends share one validation, one template rendering and one sampling path).

use std::collections::HashMap;

use mlaserve_proto::v1::{
    content_part, ChatMessage, ContentPart, FunctionCall, FunctionDefinition, GenerateRequest, ReasoningMode,
    SamplingParameters, StoppingCriteria, TokenIds, Tool, ToolCall,
};
use serde::Deserialize;
use serde_json::Value as Json;

use super::ApiError;

/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 8;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints take.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<String>,
    // Extensions (vLLM and SGLang spell them the same way).
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub reasoning: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Json>,
    pub tools: Option<Vec<Json>>,
    pub tool_choice: Option<Json>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Json,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: Common,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg, Some(param))
}

impl Common {
    pub fn choices(&self) -> Result<u32, ApiError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n),
            n => Err(bad("n", format!("`n` must be between 1 and {MAX_CHOICES}, got {n}"))),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// Sampling and stopping for choice `i`: each choice its own seed stream (seed + i).
    fn fill(&self, g: &mut GenerateRequest, i: u32, default_max: Option<u32>) -> Result<(), ApiError> {
        let mut logit_bias = HashMap::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let id: u32 = k
                .parse()
                .map_err(|_| bad("logit_bias", format!("`logit_bias` key {k:?} is not a token id")))?;
            logit_bias.insert(id, *v);
        }
        g.sampling = Some(SamplingParameters {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed.map(|s| s.wrapping_add(u64::from(i))),
            logit_bias,
        });
        let stop = match &self.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        g.stopping = Some(StoppingCriteria {
            max_new_tokens: self.max_completion_tokens.or(self.max_tokens).or(default_max),
            stop,
            stop_token_ids: vec![],
            ignore_eos: self.ignore_eos,
        });
        g.reasoning = match self.reasoning.as_deref() {
            None => ReasoningMode::Unspecified,
            Some("separate") => ReasoningMode::Separate,
            Some("inline") => ReasoningMode::Inline,
            Some(o) => {
                return Err(bad(
                    "reasoning",
                    format!("`reasoning` must be \"separate\" or \"inline\", got {o:?}"),
                ))
            }
        } as i32;
        Ok(())
    }
}

fn text_of(content: &Json, at: &str) -> Result<(Option<String>, Vec<ContentPart>), ApiError> {
    match content {
        Json::Null => Ok((None, vec![])),
        Json::String(s) => Ok((Some(s.clone()), vec![])),
        Json::Array(parts) => {
            let mut out = vec![];
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Json::as_str), p.get("text").and_then(Json::as_str)) {
                    (Some("text"), Some(t)) => {
                        out.push(ContentPart { part: Some(content_part::Part::Text(t.to_string())) })
                    }
                    (kind, _) => {
                        return Err(bad(
                            at,
                            format!(
                                "`{at}[{j}]`: only text parts are supported, got {}",
                                kind.unwrap_or("no type")
                            ),
                        ))
                    }
                }
            }
            Ok((None, out))
        }
        _ => Err(bad(at, format!("`{at}` must be a string, an array of text parts or null"))),
    }
}

fn str_field(v: &Json, key: &str, at: &str) -> Result<Option<String>, ApiError> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(at, format!("`{at}.{key}` must be a string"))),
    }
}

fn message(m: &Json, i: usize) -> Result<ChatMessage, ApiError> {
    let at = format!("messages[{i}]");
    if !m.is_object() {
        return Err(bad(&at, format!("`{at}` must be an object")));
    }
    let role = str_field(m, "role", &at)?.ok_or_else(|| bad(&at, format!("`{at}.role` is required")))?;
    let (content, parts) = text_of(m.get("content").unwrap_or(&Json::Null), &format!("{at}.content"))?;
    let mut tool_calls = vec![];
    for (j, c) in m.get("tool_calls").and_then(Json::as_array).into_iter().flatten().enumerate() {
        let at = format!("{at}.tool_calls[{j}]");
        let f = c.get("function").ok_or_else(|| bad(&at, format!("`{at}.function` is required")))?;
        tool_calls.push(ToolCall {
            id: str_field(c, "id", &at)?.unwrap_or_default(),
            r#type: str_field(c, "type", &at)?.unwrap_or_else(|| "function".into()),
            function: Some(FunctionCall {
                name: str_field(f, "name", &at)?.unwrap_or_default(),
                arguments: str_field(f, "arguments", &at)?.unwrap_or_default(),
            }),
        });
    }
    Ok(ChatMessage {
        role,
        content,
        parts,
        tool_calls,
        tool_call_id: str_field(m, "tool_call_id", &at)?,
        name: str_field(m, "name", &at)?,
    })
}

fn tool(t: &Json, i: usize) -> Result<Tool, ApiError> {
    let at = format!("tools[{i}]");
    let f = t.get("function").ok_or_else(|| bad(&at, format!("`{at}.function` is required")))?;
    let name =
        str_field(f, "name", &at)?.ok_or_else(|| bad(&at, format!("`{at}.function.name` is required")))?;
    Ok(Tool {
        r#type: str_field(t, "type", &at)?.unwrap_or_else(|| "function".into()),
        function: Some(FunctionDefinition {
            name,
            description: str_field(f, "description", &at)?.unwrap_or_default(),
            parameters_json: f.get("parameters").map(|p| p.to_string()).unwrap_or_default(),
        }),
    })
}

impl ChatRequest {
    /// The gRPC request for choice `i`.
    pub fn to_generate(&self, i: u32) -> Result<GenerateRequest, ApiError> {
        let messages =
            self.messages.iter().enumerate().map(|(i, m)| message(m, i)).collect::<Result<Vec<_>, _>>()?;
        let tools = self
            .tools
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| tool(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        let tool_choice = match &self.tool_choice {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(o @ Json::Object(_)) => Some(
                o.pointer("/function/name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad("tool_choice", "`tool_choice.function.name` is required"))?
                    .to_string(),
            ),
            Some(_) => return Err(bad("tool_choice", "`tool_choice` must be a string or an object")),
        };
        if self.top_logprobs.is_some_and(|n| n > 0) && self.logprobs != Some(true) {
            return Err(bad("top_logprobs", "`top_logprobs` requires `logprobs: true`"));
        }
        let mut g = GenerateRequest {
            messages,
            tools,
            tool_choice,
            logprobs: self.logprobs.unwrap_or(false),
            top_logprobs: self.top_logprobs.unwrap_or(0),
            ..Default::default()
        };
        self.common.fill(&mut g, i, None)?;
        Ok(g)
    }
}

impl CompletionRequest {
    pub fn to_generate(&self, i: u32) -> Result<GenerateRequest, ApiError> {
        if self.echo == Some(true) {
            return Err(bad("echo", "`echo` is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(bad("suffix", "`suffix` is not supported"));
        }
        let mut g = GenerateRequest {
            logprobs: self.logprobs.is_some(),
            top_logprobs: self.logprobs.unwrap_or(0),
            ..Default::default()
        };
        match &self.prompt {
            Json::String(s) => g.prompt = Some(s.clone()),
            Json::Array(a) if a.len() == 1 && a[0].is_string() => {
                g.prompt = a[0].as_str().map(str::to_string)
            }
            Json::Array(a) if a.iter().all(|t| t.is_u64()) => {
                let ids = a
                    .iter()
                    .map(|t| t.as_u64().and_then(|v| u32::try_from(v).ok()))
                    .collect::<Option<Vec<u32>>>();
                g.input_ids = Some(TokenIds {
                    ids: ids.ok_or_else(|| bad("prompt", "token ids must fit in 32 bits"))?,
                });
            }
            _ => {
                return Err(bad(
                    "prompt",
                    "`prompt` must be a string, one string in an array, or an array of token ids",
                ))
            }
        }
        // OpenAI's default for completions.
        self.common.fill(&mut g, i, Some(16))?;
        Ok(g)
    }
}
