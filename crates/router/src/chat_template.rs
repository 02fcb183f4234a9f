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

/// DeepSeek-V3's chat format (original V3 revision), written from the behaviour described in
/// docs/deepseek-v3.md section 11, quirks included: system prompts are joined without any marker
/// right after BOS; the first tool call of the conversation opens `<｜tool▁calls▁begin｜>` and later
/// calls close the block after each call (a single call is never closed, and a second tool-call
/// turn gets no opening markers); tool outputs open once per conversation.
///
/// One deliberate reading: an assistant turn counts as a tool-call turn when its content is null
/// *or absent*, because transformers (5.x) drops null-valued keys before rendering, and so do we.
///
/// Every tag trims the whitespace around it, so only the `{{ }}` expressions produce output.
pub const DEEPSEEK_V3_TEMPLATE: &str = r#"{#- DeepSeek-V3 chat format -#}
{%- if add_generation_prompt is not defined -%}
    {%- set add_generation_prompt = false -%}
{%- endif -%}
{%- set ns = namespace(is_first=false, is_tool=false, is_output_first=true,
                      system_prompt='', is_first_sp=true) -%}
{#- Pass 1: every system message, joined by a blank line, becomes the unmarked prefix. -#}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if ns.is_first_sp -%}
            {%- set ns.system_prompt = ns.system_prompt + message['content'] -%}
            {%- set ns.is_first_sp = false -%}
        {%- else -%}
            {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{{- ns.system_prompt -}}
{#- Pass 2: the conversation. -#}
{%- for message in messages -%}
    {%- set no_content = message['content'] is not defined or message['content'] is none -%}
    {%- if message['role'] == 'user' -%}
        {%- set ns.is_tool = false -%}
        {{- '<｜User｜>' + message['content'] -}}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and no_content -%}
        {%- set ns.is_tool = false -%}
        {%- for tool in message['tool_calls'] -%}
            {%- set call = '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']
                + '\n```json\n' + tool['function']['arguments'] + '\n```<｜tool▁call▁end｜>' -%}
            {%- if not ns.is_first -%}
                {{- '<｜Assistant｜><｜tool▁calls▁begin｜>' + call -}}
                {%- set ns.is_first = true -%}
            {%- else -%}
                {{- '\n' + call + '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and not no_content -%}
        {%- if ns.is_tool -%}
            {{- '<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}
            {%- set ns.is_tool = false -%}
        {%- else -%}
            {{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}
        {%- endif -%}
    {%- endif -%}
    {%- if message['role'] == 'tool' -%}
        {%- set ns.is_tool = true -%}
        {%- if ns.is_output_first -%}
            {{- '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}
            {%- set ns.is_output_first = false -%}
        {%- else -%}
            {{- '\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if ns.is_tool -%}
    {{- '<｜tool▁outputs▁end｜>' -}}
{%- endif -%}
{%- if add_generation_prompt and not ns.is_tool -%}
    {{- '<｜Assistant｜>' -}}
{%- endif -%}"#;

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
struct Raised(String);

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

/// jinja2's `join(value, d='', attribute=None)`: items printed with Python's `str()`.
fn join(
    value: &Value,
    sep: Option<String>,
    attribute: Option<Value>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let sep = param(sep, &kwargs, "d")?.unwrap_or_default();
    let attribute = param(attribute, &kwargs, "attribute")?;
    kwargs.assert_all_used()?;
    let items: Vec<Value> = match value.as_str() {
        // A string joins its characters.
        Some(s) => s.chars().map(Value::from).collect(),
        None => value.try_iter()?.collect(),
    };
    // The separator repeats per item, so the result can dwarf the input: bound it.
    let too_big = || Error::new(ErrorKind::InvalidOperation, "join: result too large");
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&sep);
        }
        let text = match &attribute {
            None => py_str(item),
            Some(path) => py_str(&attribute_path(item, path)?),
        };
        out.push_str(&text);
        if out.len() > MAX_STRING_BYTES {
            return Err(too_big());
        }
    }
    Ok(out)
}

/// Bound for strings our filters build, far above any prompt a model can take.
const MAX_STRING_BYTES: usize = 64 << 20;

/// A parameter that Python lets callers pass by position or by name (minijinja only has positions).
fn param<'a, T>(positional: Option<T>, kwargs: &'a Kwargs, name: &'a str) -> Result<Option<T>, Error>
where
    T: minijinja::value::ArgType<'a, Output = T>,
{
    let named: Option<T> = kwargs.get(name)?;
    match (positional, named) {
        (Some(_), Some(_)) => {
            Err(Error::new(ErrorKind::TooManyArguments, format!("got multiple values for {name}")))
        }
        (p, n) => Ok(p.or(n)),
    }
}

/// jinja2's `truncate(s, length=255, killwords=False, end='...', leeway=5)`, in characters.
fn truncate(
    v: Value,
    length: Option<usize>,
    killwords: Option<bool>,
    end: Option<String>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let length = param(length, &kwargs, "length")?.unwrap_or(255);
    let killwords = param(killwords, &kwargs, "killwords")?.unwrap_or(false);
    let end = param(end, &kwargs, "end")?.unwrap_or_else(|| "...".into());
    let leeway = kwargs.get::<Option<usize>>("leeway")?.unwrap_or(5);
    kwargs.assert_all_used()?;
    let s = py_str(&v);
    let end_len = end.chars().count();
    if length < end_len {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("truncate: expected length >= {end_len}"),
        ));
    }
    if s.chars().count() <= length + leeway {
        return Ok(s);
    }
    let head: String = s.chars().take(length - end_len).collect();
    let head = if killwords { &head[..] } else { head.rsplit_once(' ').map_or(&head[..], |(a, _)| a) };
    Ok(format!("{head}{end}"))
}

/// Python's `str.center(width)`, including where the odd padding space goes.
fn py_center(s: &str, width: usize) -> String {
    let len = s.chars().count();
    if len >= width {
        return s.to_owned();
    }
    let marg = width - len;
    let left = marg / 2 + (marg & width & 1);
    format!("{}{s}{}", " ".repeat(left), " ".repeat(marg - left))
}

/// jinja2's `wordcount`: the number of `\w+` runs.
fn wordcount(s: &str) -> usize {
    s.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).count()
}

/// markupsafe's escape (`&#39;` and `&#34;` for quotes, `/` untouched); safe strings pass through.
fn escape(v: Value) -> Value {
    if v.is_safe() {
        return v;
    }
    let s = py_str(&v);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    Value::from_safe_string(out)
}

/// jinja2's attribute getter: an int index, or a dotted path whose integer parts index lists.
fn attribute_path(item: &Value, path: &Value) -> Result<Value, Error> {
    if path.is_integer() {
        return item.get_item(path);
    }
    let mut cur = item.clone();
    for part in path.as_str().unwrap_or_default().split('.') {
        cur = match part.parse::<i64>() {
            Ok(i) => cur.get_item(&Value::from(i))?,
            Err(_) => cur.get_attr(part)?,
        };
    }
    Ok(cur)
}

/// `raise_exception(msg)`: abort rendering with the template's own message.
fn raise_exception(msg: Value) -> Result<Value, Error> {
    let msg = if let Some(s) = msg.as_str() { s.to_owned() } else { py_str(&msg) };
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

/// `strftime_now(fmt)`: the local time, formatted like Python's naive `datetime.now().strftime`.
fn strftime_now(fmt: &str) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let bad = || Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported format {fmt:?}"));
    if StrftimeItems::new(fmt).any(|i| matches!(i, Item::Error)) {
        return Err(bad());
    }
    let mut s = String::new();
    // Writing (not to_string) so that a specifier a naive time cannot fill (%z) is an error, not a panic.
    write!(s, "{}", chrono::Local::now().naive_local().format(fmt)).map_err(|_| bad())?;
    Ok(s)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`. The first two may also be given positionally, in that order.
fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let ensure_ascii = param(ensure_ascii, &kwargs, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match param(indent, &kwargs, "indent")? {
        None => None,
        Some(v) if v.is_integer() => Some(" ".repeat(usize::try_from(i64::try_from(v)?).unwrap_or(0))),
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) => return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: bad indent {v}"))),
    };
    if indent.as_ref().is_some_and(|i| i.len() > MAX_INDENT) {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent too large"));
    }
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        None => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_owned(), b.as_str().unwrap_or_default().to_owned())
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be 2 strings",
                    ))
                }
            }
        }
    };
    let sort_keys = kwargs.get::<Option<Value>>("sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let opts = JsonOpts { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0, 0)?;
    Ok(out)
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Python's json encoder gives up on deep nesting too; this keeps our recursion bounded.
const MAX_JSON_DEPTH: usize = 500;
const MAX_INDENT: usize = 256;

fn not_serializable(v: &Value) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("Object of type {} is not JSON serializable", v.kind()))
}

fn write_json(out: &mut String, v: &Value, o: &JsonOpts, level: usize, depth: usize) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&py_number(v, true)),
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, o, level, '[', ']', items.len(), |out, i| {
                write_json(out, &items[i], o, level + 1, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = vec![];
            for key in v.try_iter()? {
                let value = v.get_item(&key)?;
                entries.push((json_key(&key)?, value));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, o, level, '{', '}', entries.len(), |out, i| {
                json_string(out, &entries[i].0, o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &entries[i].1, o, level + 1, depth + 1)
            })?;
        }
        _ => return Err(not_serializable(v)),
    }
    Ok(())
}

/// Python's layout: `[a, b]` without indent; one item per line, indented per level, with it.
fn write_container(
    out: &mut String,
    o: &JsonOpts,
    level: usize,
    open: char,
    close: char,
    len: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, lvl: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..lvl {
                out.push_str(ind);
            }
        }
    };
    for i in 0..len {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(out, level + 1);
        item(out, i)?;
        // Indentation grows with depth, so the text can dwarf the value: bound it.
        if out.len() > MAX_STRING_BYTES {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: result too large"));
        }
    }
    newline(out, level);
    out.push(close);
    Ok(())
}

/// Dict keys as Python's json converts them: str as is; int, float, bool, None spelled out.
fn json_key(k: &Value) -> Result<String, Error> {
    match k.kind() {
        ValueKind::String => Ok(k.as_str().unwrap_or_default().to_owned()),
        ValueKind::Number => Ok(py_number(k, true)),
        ValueKind::Bool => Ok(if k.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("keys must be str, int, float, bool or None, not {}", k.kind()),
        )),
    }
}

/// A JSON string literal as Python's json module writes it.
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// An int as digits; a float as Python's `repr` (JSON: NaN / Infinity, as Python writes them).
fn py_number(v: &Value, json: bool) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    match (f.is_nan(), f.is_infinite(), json) {
        (true, _, true) => "NaN".to_owned(),
        (true, _, false) => "nan".to_owned(),
        (_, true, true) => if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
        (_, true, false) => if f > 0.0 { "inf" } else { "-inf" }.to_owned(),
        _ => py_float_repr(f),
    }
}

/// Python's `repr(float)` for finite values: shortest round-trip digits, positional notation for
/// decimal exponents in [-4, 16), else `d.ddde+XX`.
fn py_float_repr(f: f64) -> String {
    // Rust's `{:e}` gives the same shortest digits, e.g. "-1.5e-7", "1e16", "0e0".
    let sci = format!("{f:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else { return f.to_string() };
    let Ok(exp) = exp.parse::<i32>() else { return f.to_string() };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut s = sign.to_owned();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                s.push_str(&"0".repeat(int_len - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        } else {
            s.push_str("0.");
            s.push_str(&"0".repeat((-exp - 1) as usize));
            s.push_str(&digits);
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let _ = write!(s, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.unsigned_abs());
    }
    s
}

/// Python's `str(x)`, which jinja2 uses to print values.
fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(v, 0),
    }
}

/// Python's `repr(x)` for the JSON-like values templates handle.
fn py_repr(v: &Value, depth: usize) -> String {
    if depth > MAX_JSON_DEPTH {
        return "...".to_owned();
    }
    match v.kind() {
        ValueKind::None => "None".to_owned(),
        ValueKind::Undefined => "Undefined".to_owned(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.to_owned(),
        ValueKind::Number => py_number(v, false),
        ValueKind::String => py_str_repr(v.as_str().unwrap_or_default()),
        ValueKind::Seq if v.is_tuple() => {
            let items: Vec<String> =
                v.try_iter().into_iter().flatten().map(|x| py_repr(&x, depth + 1)).collect();
            if items.len() == 1 {
                format!("({},)", items[0])
            } else {
                format!("({})", items.join(", "))
            }
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> =
                v.try_iter().into_iter().flatten().map(|x| py_repr(&x, depth + 1)).collect();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = v
                .try_iter()
                .into_iter()
                .flatten()
                .map(|k| {
                    let val = v.get_item(&k).unwrap_or_default();
                    format!("{}: {}", py_repr(&k, depth + 1), py_repr(&val, depth + 1))
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// Python's string repr: single quotes unless the text has one and no double quote; escapes for
/// backslash, the quote and non-printable characters (a common subset of `str.isprintable`).
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) || c == '\u{ad}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{1680}'
            | '\u{2000}'..='\u{200f}'
            | '\u{2028}'..='\u{202f}'
            | '\u{205f}'..='\u{2064}'
            | '\u{3000}'
            | '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
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

#[cfg(test)]
mod tests {
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
    fn deepseek_tool_calls_follow_the_documented_quirks() {
        let tc = |c: &Json| {
            format!(
                "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>",
                c["function"]["name"].as_str().unwrap(),
                c["function"]["arguments"].as_str().unwrap()
            )
        };
        let c1 = call("c1", "get_weather", r#"{"city": "Paris"}"#);
        let c2 = call("c2", "get_time", r#"{"tz": "CET"}"#);
        let c3 = call("c3", "search", "{}");
        let msgs = [
            json!({"role": "user", "content": "Weather and time?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [c1, c2]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "18C"}),
            json!({"role": "tool", "tool_call_id": "c2", "content": "12:00"}),
            json!({"role": "assistant", "content": "18C at noon."}),
            json!({"role": "user", "content": "Search"}),
            // No content key at all: also a tool-call turn.
            json!({"role": "assistant", "tool_calls": [c3]}),
            json!({"role": "tool", "tool_call_id": "c3", "content": "found"}),
        ];
        let want = format!(
            "{BOS}<｜User｜>Weather and time?<｜Assistant｜><｜tool▁calls▁begin｜>{}\n{}<｜tool▁calls▁end｜>{EOS}\
             <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\
             \n<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>18C at noon.{EOS}\
             <｜User｜>Search\n{}<｜tool▁calls▁end｜>{EOS}\n<｜tool▁output▁begin｜>found<｜tool▁output▁end｜>\
             <｜tool▁outputs▁end｜>",
            tc(&c1),
            tc(&c2),
            tc(&c3)
        );
        // Ends in a tool result: no generation prompt even when asked.
        assert_eq!(ds().render(&msgs, None, true).unwrap(), want);

        // A single call is never closed.
        let single = [msgs[0].clone(), json!({"role": "assistant", "content": null, "tool_calls": [c3]})];
        let want =
            format!("{BOS}<｜User｜>Weather and time?<｜Assistant｜><｜tool▁calls▁begin｜>{}", tc(&c3));
        assert_eq!(ds().render(&single, None, false).unwrap(), want);
        assert_eq!(ds().render(&single, None, true).unwrap(), format!("{want}<｜Assistant｜>"));
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
        let msgs = [
            json!({"x": {"b": [1, {"c": "é\"\\\n\u{1}\u{7f}𝄞"}], "a": null, "f": 1.5e-7, "e": [], "d": {}}}),
        ];
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
        let msgs =
            [json!({"role": "user", "x": {"y": [5, 6]}}), json!({"role": "assistant", "x": {"y": [7]}})];
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
        let t =
            ChatTemplate::new("{% for t in tools %}{{ t.function.name }};{% endfor %}", None, None).unwrap();
        let tools =
            [json!({"type": "function", "function": {"name": "f"}}), json!({"function": {"name": "g"}})];
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
        let forever =
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
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
}
