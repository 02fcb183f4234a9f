//! Python's behaviour where templates can observe it: `str()` and `repr()` of values, json.dumps
//! for `tojson`, and jinja2's filters that minijinja lacks or spells differently.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

use super::Raised;

/// jinja2's `join(value, d='', attribute=None)`: items printed with Python's `str()`.
pub(super) fn join(
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
pub(super) const MAX_STRING_BYTES: usize = 64 << 20;

/// A parameter that Python lets callers pass by position or by name (minijinja only has positions).
pub(super) fn param<'a, T>(
    positional: Option<T>,
    kwargs: &'a Kwargs,
    name: &'a str,
) -> Result<Option<T>, Error>
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
pub(super) fn truncate(
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
pub(super) fn py_center(s: &str, width: usize) -> String {
    let len = s.chars().count();
    if len >= width {
        return s.to_owned();
    }
    let marg = width - len;
    let left = marg / 2 + (marg & width & 1);
    format!("{}{s}{}", " ".repeat(left), " ".repeat(marg - left))
}

/// jinja2's `wordcount`: the number of `\w+` runs.
pub(super) fn wordcount(s: &str) -> usize {
    s.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).count()
}

/// markupsafe's escape (`&#39;` and `&#34;` for quotes, `/` untouched); safe strings pass through.
pub(super) fn escape(v: Value) -> Value {
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
pub(super) fn attribute_path(item: &Value, path: &Value) -> Result<Value, Error> {
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
pub(super) fn raise_exception(msg: Value) -> Result<Value, Error> {
    let msg = if let Some(s) = msg.as_str() { s.to_owned() } else { py_str(&msg) };
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

/// `strftime_now(fmt)`: the local time, formatted like Python's naive `datetime.now().strftime`.
pub(super) fn strftime_now(fmt: &str) -> Result<String, Error> {
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
pub(super) fn tojson(
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

pub(super) struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Python's json encoder gives up on deep nesting too; this keeps our recursion bounded.
const MAX_JSON_DEPTH: usize = 500;
const MAX_INDENT: usize = 256;

pub(super) fn not_serializable(v: &Value) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("Object of type {} is not JSON serializable", v.kind()))
}

pub(super) fn write_json(
    out: &mut String,
    v: &Value,
    o: &JsonOpts,
    level: usize,
    depth: usize,
) -> Result<(), Error> {
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
pub(super) fn write_container(
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
pub(super) fn json_key(k: &Value) -> Result<String, Error> {
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
pub(super) fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
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
pub(super) fn py_number(v: &Value, json: bool) -> String {
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
pub(super) fn py_float_repr(f: f64) -> String {
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
pub(super) fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(v, 0),
    }
}

/// Python's `repr(x)` for the JSON-like values templates handle.
pub(super) fn py_repr(v: &Value, depth: usize) -> String {
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
pub(super) fn py_str_repr(s: &str) -> String {
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
