//! The model's tokenizer (`tokenizer.json`) and the Hugging Face facts around it
//! (`tokenizer_config.json`: special tokens, `add_bos_token`, `model_max_length`, chat templates).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::chat_template::{ChatTemplate, TemplateError};

const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";
/// Recent transformers save templates as files; when present they take precedence over the config.
const TEMPLATE_FILE: &str = "chat_template.jinja";
const TEMPLATE_DIR: &str = "additional_chat_templates";

/// transformers writes `int(1e30)` for "no limit"; anything this large is treated as unset.
const NO_LIMIT: f64 = 1e18;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot load tokenizer from {}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("invalid {origin}: {message}")]
    Config { origin: String, message: String },
    #[error("chat template {name:?} from {origin}: {source}")]
    Template { origin: String, name: String, source: TemplateError },
    #[error("tokenizer failed to encode: {0}")]
    Encode(String),
    #[error("tokenizer failed to decode: {0}")]
    Decode(String),
}

/// A loaded tokenizer plus the metadata the router needs from `tokenizer_config.json`.
pub struct TokenizerInfo {
    tokenizer: Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: Option<bool>,
    model_max_length: Option<usize>,
    /// Named chat templates in config order; `default_template` indexes the default one.
    templates: Vec<(String, ChatTemplate)>,
    default_template: Option<usize>,
}

impl std::fmt::Debug for TokenizerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerInfo")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("model_max_length", &self.model_max_length)
            .field("templates", &self.templates.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .finish()
    }
}

impl TokenizerInfo {
    /// Loads `<dir>/tokenizer.json` and, when present, `<dir>/tokenizer_config.json` and the
    /// template files transformers writes (`chat_template.jinja`, `additional_chat_templates/*.jinja`),
    /// which replace the config's `chat_template` as they do in transformers.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::Load { path: path.clone(), message: e.to_string() })?;

        let config_path = dir.join(CONFIG_FILE);
        let config = match read_optional(&config_path)? {
            Some(s) => Some(serde_json::from_str(&s).map_err(|e| TokenizerError::Config {
                origin: config_path.display().to_string(),
                message: e.to_string(),
            })?),
            None => None,
        };

        let mut files = vec![];
        let default_path = dir.join(TEMPLATE_FILE);
        if let Some(source) = read_optional(&default_path)? {
            files.push(NamedSource {
                name: "default".into(),
                origin: default_path.display().to_string(),
                source,
            });
        }
        let extra_dir = dir.join(TEMPLATE_DIR);
        if extra_dir.is_dir() {
            let entries = std::fs::read_dir(&extra_dir)
                .map_err(|source| TokenizerError::Io { path: extra_dir.clone(), source })?;
            let mut extra = vec![];
            for entry in entries {
                let path =
                    entry.map_err(|source| TokenizerError::Io { path: extra_dir.clone(), source })?.path();
                let name = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned);
                if let (Some(name), Some("jinja")) = (name, path.extension().and_then(|e| e.to_str())) {
                    let source = std::fs::read_to_string(&path)
                        .map_err(|source| TokenizerError::Io { path: path.clone(), source })?;
                    extra.push(NamedSource { name, origin: path.display().to_string(), source });
                }
            }
            extra.sort_by(|a, b| a.name.cmp(&b.name));
            files.extend(extra);
        }
        Self::build(tokenizer, config, &config_path.display().to_string(), files)
    }

    /// Builds from an in-memory tokenizer and the parsed `tokenizer_config.json` (if any).
    pub fn from_parts(tokenizer: Tokenizer, config_json: Option<Json>) -> Result<Self, TokenizerError> {
        Self::build(tokenizer, config_json, CONFIG_FILE, vec![])
    }

    fn build(
        tokenizer: Tokenizer,
        config: Option<Json>,
        origin: &str,
        template_files: Vec<NamedSource>,
    ) -> Result<Self, TokenizerError> {
        let empty = serde_json::Map::new();
        let cfg = match &config {
            None => &empty,
            Some(Json::Object(m)) => m,
            Some(_) => return Err(config_err(origin, "expected a JSON object")),
        };
        let bos_token = special_token(cfg, "bos_token", origin)?;
        let eos_token = special_token(cfg, "eos_token", origin)?;
        // Informational only: like transformers 5 `from_pretrained`, which drops these flags when a
        // tokenizer.json exists, encoding follows tokenizer.json's own post-processor.
        let add_bos_token = flag(cfg, "add_bos_token", origin)?;
        let model_max_length = match cfg.get("model_max_length") {
            None | Some(Json::Null) => None,
            Some(v) => match v.as_f64() {
                Some(n) if (0.0..NO_LIMIT).contains(&n) => Some(v.as_u64().unwrap_or(n as u64) as usize),
                Some(_) => None,
                None => return Err(config_err(origin, "`model_max_length` must be a number")),
            },
        };

        let named = |name: &str, source: &str| NamedSource {
            name: name.to_owned(),
            origin: origin.to_owned(),
            source: source.to_owned(),
        };
        let sources: Vec<NamedSource> = if !template_files.is_empty() {
            template_files
        } else {
            match cfg.get("chat_template") {
                None | Some(Json::Null) => vec![],
                Some(Json::String(s)) => vec![named("default", s)],
                Some(Json::Array(list)) => list
                    .iter()
                    .map(|t| {
                        match (t.get("name").and_then(Json::as_str), t.get("template").and_then(Json::as_str))
                        {
                            (Some(n), Some(s)) => Ok(named(n, s)),
                            _ => Err(config_err(
                                origin,
                                "`chat_template` entries need string `name` and `template`",
                            )),
                        }
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(config_err(origin, "`chat_template` must be a string or a list")),
            }
        };
        let templates = sources
            .into_iter()
            .map(|NamedSource { name, origin, source }| {
                match ChatTemplate::new(&source, bos_token.clone(), eos_token.clone()) {
                    Ok(t) => Ok((name, t)),
                    Err(source) => Err(TokenizerError::Template { origin, name, source }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let default_template =
            templates.iter().position(|(n, _)| n == "default").or((!templates.is_empty()).then_some(0));

        Ok(Self {
            tokenizer,
            bos_token,
            eos_token,
            add_bos_token,
            model_max_length,
            templates,
            default_template,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids and their token strings (vocabulary spelling, e.g. `Ġhello` or `<0xE2>`).
    pub fn encode_with_tokens(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<String>), TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_tokens().to_vec()))
    }

    /// Decodes ids (unknown ids are skipped); incomplete UTF-8 decodes as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The text of one token for display (logprobs): decoded on its own, special tokens kept. A byte
    /// piece of a multi-byte character shows as U+FFFD; an unknown id gives an empty string.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .decode(&[id], false)
            .ok()
            .or_else(|| self.tokenizer.id_to_token(id))
            .unwrap_or_default()
    }

    /// Number of ids the tokenizer can produce: the model vocabulary plus added tokens (at least one
    /// past the highest added id, in case ids leave gaps).
    pub fn vocab_size(&self) -> usize {
        let highest_added =
            self.tokenizer.get_added_vocabulary().get_vocab().values().max().map(|&i| i as usize + 1);
        self.tokenizer.get_vocab_size(true).max(highest_added.unwrap_or(0))
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The id of a token given by its exact spelling (e.g. `"<｜end▁of▁sentence｜>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The default chat template: the one named `default`, else the first one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.default_template.map(|i| &self.templates[i].1)
    }

    /// The template transformers would pick: `tool_use` when tools are given and it exists, else
    /// the default.
    pub fn chat_template_for(&self, has_tools: bool) -> Option<&ChatTemplate> {
        has_tools.then(|| self.chat_template_named("tool_use")).flatten().or_else(|| self.chat_template())
    }

    pub fn chat_template_named(&self, name: &str) -> Option<&ChatTemplate> {
        self.templates.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// `add_bos_token` from tokenizer_config.json. It does not change [`encode`](Self::encode):
    /// whether special tokens are added is up to tokenizer.json, as in transformers 5.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }

    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// A chat template's name, where it came from (for errors) and its text.
struct NamedSource {
    name: String,
    origin: String,
    source: String,
}

/// The file's text, or `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.to_owned(), source }),
    }
}

fn config_err(origin: &str, message: &str) -> TokenizerError {
    TokenizerError::Config { origin: origin.to_owned(), message: message.to_owned() }
}

/// `bos_token` / `eos_token`: a string, an AddedToken object `{"content": ...}`, or null.
fn special_token(
    cfg: &serde_json::Map<String, Json>,
    key: &str,
    origin: &str,
) -> Result<Option<String>, TokenizerError> {
    match cfg.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(config_err(origin, &format!("`{key}.content` must be a string"))),
        },
        Some(_) => Err(config_err(origin, &format!("`{key}` must be a string or an object with `content`"))),
    }
}

fn flag(
    cfg: &serde_json::Map<String, Json>,
    key: &str,
    origin: &str,
) -> Result<Option<bool>, TokenizerError> {
    match cfg.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(config_err(origin, &format!("`{key}` must be true or false"))),
    }
}

#[cfg(test)]
pub(crate) mod test_fixtures {
    use super::*;

    fn fixture(name: &str) -> TokenizerInfo {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        TokenizerInfo::from_dir(&dir).unwrap()
    }

    /// Byte-level BPE (GPT-2 / DeepSeek-V3 style), 400 ids, DeepSeek special tokens.
    pub fn byte_level() -> TokenizerInfo {
        fixture("byte_level")
    }

    /// Sentencepiece-style BPE with byte fallback (Llama-2 style), `<s>` / `</s>`.
    pub fn byte_fallback() -> TokenizerInfo {
        fixture("byte_fallback")
    }
}

#[cfg(test)]
mod tests {
    use super::test_fixtures::{byte_fallback, byte_level};
    use super::*;
    use serde_json::json;

    const BOS: &str = "<｜begin▁of▁sentence｜>";
    const EOS: &str = "<｜end▁of▁sentence｜>";

    fn raw(name: &str) -> Tokenizer {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).join(TOKENIZER_FILE);
        Tokenizer::from_file(path).unwrap()
    }

    #[test]
    fn loads_config_facts() {
        let t = byte_level();
        assert_eq!(t.bos_token(), Some(BOS)); // from an AddedToken object
        assert_eq!(t.eos_token(), Some(EOS)); // from a string
        assert_eq!(t.bos_token_id(), Some(0));
        assert_eq!(t.eos_token_id(), Some(1));
        assert_eq!(t.token_id("<｜User｜>"), Some(2));
        assert_eq!(t.model_max_length(), Some(131072));
        assert_eq!(t.vocab_size(), 400);
        assert!(t.chat_template().is_some());

        let t = byte_fallback();
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token(), Some("</s>")); // {"content": ...}
        assert_eq!(t.model_max_length(), None); // transformers' 1e30 "no limit"
        assert_eq!(t.vocab_size(), 544);
        assert_eq!(t.token_id("<0xE2>"), Some(3 + 0xE2));
        assert!(format!("{t:?}").contains("tool_use"));
    }

    #[test]
    fn template_list_picks_default_then_tool_use() {
        let t = byte_fallback();
        let msgs = [json!({"role": "user", "content": "hi"})];
        let default = t.chat_template().unwrap().render(&msgs, None, false).unwrap();
        assert_eq!(default, "[user] hi\n");
        let tools = [json!({"type": "function"})];
        assert_eq!(t.chat_template_for(true).unwrap().render(&msgs, Some(&tools), false).unwrap(), "TOOLS1");
        assert_eq!(t.chat_template_for(false).unwrap().render(&msgs, None, false).unwrap(), default);

        // Without a "default" entry, the first one is the default.
        let cfg = json!({"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]});
        let t = TokenizerInfo::from_parts(raw("byte_level"), Some(cfg)).unwrap();
        assert_eq!(t.chat_template().unwrap().render(&msgs, None, false).unwrap(), "A");
        assert_eq!(t.chat_template_named("b").unwrap().render(&msgs, None, false).unwrap(), "B");
        assert!(t.chat_template_named("c").is_none());
    }

    #[test]
    fn template_files_replace_config_templates() {
        let dir = std::env::temp_dir().join(format!("mlaserve-tok-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(TEMPLATE_DIR)).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/byte_fallback");
        for f in [TOKENIZER_FILE, CONFIG_FILE] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(dir.join(TEMPLATE_FILE), "FILE {{ messages | length }}").unwrap();
        std::fs::write(dir.join(TEMPLATE_DIR).join("rag.jinja"), "RAG").unwrap();
        let t = TokenizerInfo::from_dir(&dir);
        std::fs::write(dir.join(TEMPLATE_DIR).join("bad.jinja"), "{% if %}").unwrap();
        let bad = TokenizerInfo::from_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();

        let t = t.unwrap();
        let msgs = [json!({"role": "user", "content": "x"})];
        assert_eq!(t.chat_template().unwrap().render(&msgs, None, true).unwrap(), "FILE 1");
        assert_eq!(t.chat_template_named("rag").unwrap().render(&msgs, None, true).unwrap(), "RAG");
        assert!(t.chat_template_named("tool_use").is_none(), "the config's templates are replaced");
        let err = bad.unwrap_err().to_string();
        assert!(err.contains("bad.jinja") && err.contains("syntax error"), "{err}");
    }

    #[test]
    fn special_tokens_follow_tokenizer_json() {
        // byte_level: add_bos_token true in the config, but a ByteLevel post-processor that adds
        // nothing. transformers 5.24 gives [319, 284, 280, 353, 349] for "Hello world" either way.
        let t = byte_level();
        assert_eq!(t.add_bos_token(), Some(true));
        assert_eq!(t.encode("Hello world", true).unwrap(), [319, 284, 280, 353, 349]);
        assert_eq!(t.encode("Hello world", false).unwrap(), [319, 284, 280, 353, 349]);
        // byte_fallback: the TemplateProcessing in tokenizer.json prepends <s>.
        let t = byte_fallback();
        assert_eq!(t.add_bos_token(), None);
        let (ids, toks) = t.encode_with_tokens("Hello", true).unwrap();
        assert_eq!((ids[0], toks[0].as_str()), (1, "<s>"));
        assert_ne!(t.encode("Hello", false).unwrap()[0], 1);
    }

    #[test]
    fn decode_and_token_text() {
        let t = byte_level();
        let ids = t.encode("Say hello 🎉", false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), "Say hello 🎉");
        let hello = t.token_id("Ġhello").unwrap();
        assert_eq!(t.token_text(hello), " hello");
        assert_eq!(t.token_text(1), EOS);
        assert_eq!(t.token_text(ids[ids.len() - 1]), "\u{FFFD}"); // last byte of the emoji
        assert_eq!(t.token_text(1_000_000), "");
        assert_eq!(t.decode(&[0, hello, 1], true).unwrap(), " hello");
    }

    #[test]
    fn config_errors_name_the_problem() {
        let bad = [
            (json!([1]), "expected a JSON object"),
            (json!({"bos_token": 3}), "`bos_token` must be"),
            (json!({"eos_token": {"x": 1}}), "`eos_token.content`"),
            (json!({"add_bos_token": "yes"}), "`add_bos_token`"),
            (json!({"model_max_length": "big"}), "`model_max_length`"),
            (json!({"chat_template": 5}), "`chat_template` must be"),
            (json!({"chat_template": [{"name": "x"}]}), "`chat_template` entries"),
        ];
        for (cfg, want) in bad {
            let err =
                TokenizerInfo::from_parts(raw("byte_level"), Some(cfg.clone())).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(CONFIG_FILE), "{cfg}: {err}");
        }
        let err = TokenizerInfo::from_parts(raw("byte_level"), Some(json!({"chat_template": "{% if %}"})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"default\"") && err.contains("syntax"), "{err}");
    }

    #[test]
    fn missing_files_are_reported() {
        let dir = Path::new("/nonexistent/model");
        let err = TokenizerInfo::from_dir(dir).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/model/tokenizer.json"), "{err}");
        // No tokenizer_config.json: fine, just no metadata.
        let t = TokenizerInfo::from_parts(raw("byte_level"), None).unwrap();
        assert_eq!(t.bos_token(), None);
        assert!(t.chat_template().is_none());
        assert_eq!(t.model_max_length(), None);
    }
}
