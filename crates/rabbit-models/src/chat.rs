//! Chat-template rendering: the Jinja `chat_template` of a model's `tokenizer_config.json`,
//! rendered exactly like transformers'
//! `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
//!
//! transformers renders with a jinja2 `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[loopcontrols])`, no autoescaping, no kept trailing newline, and
//! adds a `tojson` filter (Python's `json.dumps`, `ensure_ascii=False`), `raise_exception`,
//! `strftime_now`, `dict` and `namespace`. The template sees `messages`, `add_generation_prompt`,
//! `tools=None`, `documents=None` and the named special tokens of the tokenizer (`bos_token`,
//! `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token` — those that are set).
//!
//! Here that environment is rebuilt on [minijinja] with the same settings, plus what chat templates
//! lean on from Python:
//!
//! * `minijinja_contrib::pycompat` for `str.strip/split/startswith/...`, `dict.items/get/...`,
//!   extended with `str.rsplit`, `str.removeprefix`, `str.removesuffix`, `str.index`/`rindex`,
//!   `str.zfill`, `str.casefold`, `str.swapcase`, `str.isspace` (Python's whitespace set),
//!   `str.find`/`rfind` in characters, `strip`/`lstrip`/`rstrip` without arguments over Python's
//!   whitespace set;
//! * a `tojson` filter reproducing `json.dumps` byte for byte (separators `", "`/`": "`, `indent`,
//!   `separators`, `sort_keys`, `ensure_ascii`, float `repr`, no HTML escaping);
//! * a formatter printing values the way Python's `str()` does (`None`, `True`, `1.0`, `1e+20`,
//!   `['a', None]`), and a `string` filter doing the same;
//! * `raise_exception(msg)` → [`ChatError::Raised`] naming the message being rendered;
//! * `strftime_now(fmt)` (UTC clock; common `strftime` directives);
//! * jinja2's lexing where minijinja's differs: string-literal escapes decoded with Python's
//!   `unicode-escape` rules (`\<newline>` continuation, `\a`, `\v`, `\U...`, unknown escapes
//!   kept), `\r\n` newlines normalized, and transformers' `{% generation %}` tag accepted;
//! * jinja2's `sequence` test (true for strings and dicts too), `trim` over Python's whitespace,
//!   and the `wordcount` / `center` filters minijinja lacks.
//!
//! Known differences left: tuples print as lists (`dict.items()` gives `['k', 1]`, not
//! `('k', 1)`); `~` and `join` print non-strings minijinja's way where they differ from `str()`;
//! `strftime_now` uses UTC where Python uses local time; `\N{...}` escapes are not decoded.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, State, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

/// Name of the template inside the environment (shows up in minijinja's error locations).
const TEMPLATE_NAME: &str = "chat_template";

/// Named special tokens transformers passes to the template (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One chat message. A JSON array of `{"role": ..., "content": ...}` objects deserializes into
/// `Vec<Message>` directly (other keys are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ... — any string; the template decides what it means.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Everything that can go wrong loading a chat template or messages, or rendering.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        source: serde_json::Error,
    },
    /// `tokenizer_config.json` has a field of the wrong shape.
    #[error("{path}: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A messages file is valid JSON but not an array of `{"role", "content"}` strings.
    #[error("{path}: {reason}")]
    BadMessages {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry (`message 2: ...`).
        reason: String,
    },
    /// The template does not compile.
    #[error("{origin}: invalid template: {detail}")]
    Syntax {
        /// Where the template came from (`<dir>/tokenizer_config.json` or `chat template`).
        origin: String,
        /// minijinja's message, with the template line.
        detail: String,
    },
    /// The template called `raise_exception(...)`.
    #[error(
        "{origin} rejected the conversation{}: {message}",
        match message_index { Some(i) => format!(" at message {i}"), None => String::new() }
    )]
    Raised {
        /// Where the template came from.
        origin: String,
        /// The template's message.
        message: String,
        /// Index (0-based) of the message being rendered when it raised, when that is known.
        message_index: Option<usize>,
    },
    /// The template failed while rendering (undefined attribute, type error, ...).
    #[error("{origin}: rendering failed: {detail}")]
    Render {
        /// Where the template came from.
        origin: String,
        /// minijinja's message, with the template line.
        detail: String,
    },
    /// `render` was given no messages (transformers refuses these too).
    #[error("cannot apply a chat template to an empty conversation: provide at least one message")]
    EmptyConversation,
}

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    special_tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// The chat template of the tokenizer in `dir`.
    ///
    /// Like transformers, a `chat_template.jinja` file next to `tokenizer_config.json` takes
    /// priority over the config's `chat_template` field. The field may be a string, or a list of
    /// `{"name", "template"}` objects (the one named `default` is used). `Ok(None)` when there is
    /// no template (no field / `null`, or no `tokenizer_config.json` and no `chat_template.jinja`).
    /// The special tokens (`bos_token`, `eos_token`, ...; strings or `{"content": ...}` objects)
    /// are read from the config for the template's context.
    pub fn from_tokenizer_config(dir: &Path) -> Result<Option<ChatTemplate>, ChatError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(
                serde_json::from_str(&text).map_err(|source| ChatError::Json {
                    path: config_path.clone(),
                    source,
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ChatError::Io {
                    path: config_path,
                    source,
                })
            }
        };
        if let Some(c) = &config {
            if !c.is_object() {
                return Err(ChatError::BadConfig {
                    path: config_path,
                    reason: "expected a JSON object".into(),
                });
            }
        }

        let mut special_tokens = Vec::new();
        if let Some(c) = &config {
            for key in SPECIAL_TOKEN_KEYS {
                if let Some(tok) = special_token(&config_path, c, key)? {
                    special_tokens.push((key.to_string(), tok));
                }
            }
        }

        let jinja_path = dir.join("chat_template.jinja");
        let (template, origin) = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => (text, jinja_path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(c) = &config else { return Ok(None) };
                match template_from_config(&config_path, c)? {
                    Some(t) => (t, format!("chat_template of {}", config_path.display())),
                    None => return Ok(None),
                }
            }
            Err(source) => {
                return Err(ChatError::Io {
                    path: jinja_path,
                    source,
                })
            }
        };
        Self::build(template, origin, special_tokens).map(Some)
    }

    /// A chat template from its source text, with the given `bos_token` / `eos_token` in its context.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, ChatError> {
        let mut special_tokens = Vec::new();
        if let Some(b) = bos_token {
            special_tokens.push(("bos_token".to_string(), b));
        }
        if let Some(e) = eos_token {
            special_tokens.push(("eos_token".to_string(), e));
        }
        Self::build(template.to_string(), "chat template".into(), special_tokens)
    }

    fn build(
        source: String,
        origin: String,
        special_tokens: Vec<(String, String)>,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, preprocess(&source))
            .map_err(|e| ChatError::Syntax {
                origin: origin.clone(),
                detail: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            special_tokens,
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens (`("bos_token", "<s>")`, ...) the template is rendered with.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// Renders `messages` like `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=add_generation_prompt)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_with_kwargs(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`render`](Self::render) with extra template variables (like transformers' `**kwargs`, e.g.
    /// `enable_thinking`); they override the special tokens of the same name.
    pub fn render_with_kwargs(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatError> {
        if messages.is_empty() {
            return Err(ChatError::EmptyConversation);
        }
        let mut ctx: Vec<(String, Value)> = Vec::new();
        for (k, v) in &self.special_tokens {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        for (k, v) in kwargs {
            ctx.retain(|(name, _)| name != k);
            ctx.push((k.clone(), Value::from_serialize(v)));
        }
        ctx.push(("messages".into(), Value::from_serialize(messages)));
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();

        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added at construction");
        tmpl.render(ctx).map_err(|e| self.render_error(e))
    }

    fn render_error(&self, e: JinjaError) -> ChatError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = cur {
            if let Some(r) = err.downcast_ref::<Raised>() {
                return ChatError::Raised {
                    origin: self.origin.clone(),
                    message: r.message.clone(),
                    message_index: r.message_index,
                };
            }
            cur = err.source();
        }
        ChatError::Render {
            origin: self.origin.clone(),
            detail: describe(&e),
        }
    }
}

/// Reads a JSON array of `{"role": ..., "content": ...}` messages from `path`.
pub fn load_messages(path: &Path) -> Result<Vec<Message>, ChatError> {
    let text = std::fs::read_to_string(path).map_err(|source| ChatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ChatError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    parse_messages(&value).map_err(|reason| ChatError::BadMessages {
        path: path.to_path_buf(),
        reason,
    })
}

/// Checks and converts a JSON value into messages; the error names the bad entry.
fn parse_messages(value: &serde_json::Value) -> Result<Vec<Message>, String> {
    let Some(items) = value.as_array() else {
        return Err(format!(
            "expected a JSON array of {{\"role\": ..., \"content\": ...}} objects, found {}",
            json_kind(value)
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return Err(format!(
                "message {i}: expected an object with \"role\" and \"content\", found {}",
                json_kind(item)
            ));
        };
        let field = |name: &str| -> Result<String, String> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "message {i}: \"{name}\" must be a string, found {}",
                    json_kind(other)
                )),
                None => Err(format!("message {i}: missing \"{name}\"")),
            }
        };
        out.push(Message {
            role: field("role")?,
            content: field("content")?,
        });
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `config[key]` as a special-token string: a string, or an AddedToken object's `content`.
fn special_token(
    path: &Path,
    config: &serde_json::Value,
    key: &str,
) -> Result<Option<String>, ChatError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(ChatError::BadConfig {
                path: path.to_path_buf(),
                reason: format!("\"{key}\" is an object without a string \"content\""),
            }),
        },
        Some(other) => Err(ChatError::BadConfig {
            path: path.to_path_buf(),
            reason: format!(
                "\"{key}\" must be a string or {{\"content\": ...}}, found {}",
                json_kind(other)
            ),
        }),
    }
}

/// The config's `chat_template`: a string, or the `default` entry of a list of named templates.
fn template_from_config(
    path: &Path,
    config: &serde_json::Value,
) -> Result<Option<String>, ChatError> {
    let bad = |reason: String| ChatError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(entries)) => {
            let mut names = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                let name = e.get("name").and_then(|n| n.as_str());
                let template = e.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(bad(format!(
                            "chat_template[{i}] must be {{\"name\": string, \"template\": string}}"
                        )))
                    }
                }
            }
            Err(bad(format!(
                "chat_template lists named templates but none is called \"default\" (names: {})",
                names.join(", ")
            )))
        }
        Some(other) => Err(bad(format!(
            "\"chat_template\" must be a string or a list of named templates, found {}",
            json_kind(other)
        ))),
    }
}

/// Rewrites a jinja2 template so minijinja reads it the way jinja2 does:
///
/// * newlines (`\r\n`, `\r`) are normalized to `\n`, as jinja2's lexer does;
/// * string literals inside tags are decoded with Python's `unicode-escape` rules (jinja2's), which
///   differ from minijinja's for `\<newline>` (a line continuation), `\a`, `\v`, `\/`,
///   `\UXXXXXXXX`, `\N{...}` and unknown escapes, then re-quoted for minijinja;
/// * transformers' `{% generation %}...{% endgeneration %}` (its `AssistantTracker` extension,
///   which only records offsets for assistant masks and otherwise renders the body as-is) becomes
///   `{% if true %}...{% endif %}`, keeping the whitespace-control markers.
///
/// Text outside tags, comments and `{% raw %}` blocks are copied unchanged.
fn preprocess(source: &str) -> String {
    let source = source.replace("\r\n", "\n").replace('\r', "\n");
    let src = source.as_str();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let rest = &src[i..];
        let Some(open) = ["{{", "{%", "{#"].iter().filter_map(|d| rest.find(d)).min() else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..open]);
        i += open;
        let rest = &src[i..];
        if rest.starts_with("{#") {
            let len = rest.find("#}").map_or(rest.len(), |e| e + 2);
            out.push_str(&rest[..len]);
            i += len;
            continue;
        }
        let is_block = rest.starts_with("{%");
        if is_block {
            if let Some(len) = raw_block_len(rest) {
                out.push_str(&rest[..len]);
                i += len;
                continue;
            }
        }
        let len = rewrite_tag(rest, is_block, &mut out);
        i += len;
    }
    out
}

/// If `tag` starts a `{% raw %}` block, its length through `{% endraw %}` (or to the end).
fn raw_block_len(tag: &str) -> Option<usize> {
    let (name, end) = block_tag_name(tag)?;
    if name != "raw" {
        return None;
    }
    let mut pos = end;
    while let Some(off) = tag[pos..].find("{%") {
        let at = pos + off;
        if let Some(("endraw", e)) = block_tag_name(&tag[at..]) {
            return Some(at + e);
        }
        pos = at + 2;
    }
    Some(tag.len())
}

/// For a block tag made of one word (`{%- raw %}`), that word and the tag's length.
fn block_tag_name(tag: &str) -> Option<(&str, usize)> {
    let end = tag.find("%}")?;
    let inner = tag[2..end].trim_start_matches(['-', '+']);
    let inner = inner.trim_end_matches(['-', '+']).trim();
    if inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Some((inner, end + 2))
    } else {
        None
    }
}

/// Copies the tag at the start of `tag` (`{{ ... }}` or `{% ... %}`) into `out` with its string
/// literals re-quoted (and a `generation` tag renamed); returns the length consumed.
fn rewrite_tag(tag: &str, is_block: bool, out: &mut String) -> usize {
    if is_block {
        if let Some((name, len)) = block_tag_name(tag) {
            let replacement = match name {
                "generation" => Some("if true"),
                "endgeneration" => Some("endif"),
                _ => None,
            };
            if let Some(r) = replacement {
                let inner = &tag[2..len - 2];
                let open_mod = inner.chars().next().filter(|c| matches!(c, '-' | '+'));
                let close_mod = inner.chars().last().filter(|c| matches!(c, '-' | '+'));
                out.push_str("{%");
                out.extend(open_mod);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.extend(close_mod);
                out.push_str("%}");
                return len;
            }
        }
    }
    let close = if is_block { '%' } else { '}' };
    let bytes = tag.as_bytes();
    out.push_str(&tag[..2]);
    let mut i = 2;
    let mut depth = 0usize;
    while i < tag.len() {
        let c = bytes[i];
        match c {
            b'\'' | b'"' => {
                // A jinja2 string literal: up to the next unescaped matching quote.
                let mut j = i + 1;
                while j < tag.len() && bytes[j] != c {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                if j >= tag.len() {
                    // Unterminated: leave it for minijinja to report.
                    out.push_str(&tag[i..]);
                    return tag.len();
                }
                let body = &tag[i + 1..j];
                if body.contains('\\') {
                    requote(&py_unescape(body), out);
                } else {
                    out.push_str(&tag[i..=j]);
                }
                i = j + 1;
                continue;
            }
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' if depth > 0 => depth -= 1,
            _ => {}
        }
        if depth == 0 && c == close as u8 && bytes.get(i + 1) == Some(&b'}') {
            out.push_str(&tag[i..i + 2]);
            return i + 2;
        }
        // Copy one character (possibly multi-byte).
        let ch_len = tag[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&tag[i..i + ch_len]);
        i += ch_len;
    }
    tag.len()
}

/// A double-quoted minijinja string literal whose value is exactly `value`.
fn requote(value: &str, out: &mut String) {
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `unicode-escape` decoding of a string literal's body (what jinja2 applies).
fn py_unescape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('\\');
            break;
        };
        let hex = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| {
            let mut s = String::new();
            for _ in 0..n {
                match chars.peek() {
                    Some(h) if h.is_ascii_hexdigit() => {
                        s.push(*h);
                        chars.next();
                    }
                    _ => return (s, None),
                }
            }
            let v = u32::from_str_radix(&s, 16).ok();
            (s, v)
        };
        match d {
            '\n' => {}
            '\\' => out.push('\\'),
            '\'' => out.push('\''),
            '"' => out.push('"'),
            'a' => out.push('\x07'),
            'b' => out.push('\x08'),
            'f' => out.push('\x0c'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\x0b'),
            '0'..='7' => {
                let mut v = d.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.peek().and_then(|o| o.to_digit(8)) {
                        Some(o) => {
                            v = v * 8 + o;
                            chars.next();
                        }
                        None => break,
                    }
                }
                out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
            }
            'x' | 'u' | 'U' => {
                let n = match d {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let (digits, v) = hex(&mut chars, n);
                match v.and_then(char::from_u32) {
                    Some(ch) => out.push(ch),
                    // Python raises here; keep the text so minijinja still has something.
                    None => {
                        out.push('\\');
                        out.push(d);
                        out.push_str(&digits);
                    }
                }
            }
            'N' if chars.peek() == Some(&'{') => {
                // Named characters are not supported; keep the escape verbatim.
                out.push_str("\\N");
            }
            other => {
                out.push('\\');
                out.push(other);
            }
        }
    }
    out
}

/// minijinja's error message with its location and causes, on one line.
fn describe(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let _ = write!(s, ": {err}");
        cur = err.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------------------------

/// The jinja2 environment transformers compiles chat templates in, rebuilt on minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(unknown_method);
    env.set_formatter(|out, state, value| {
        match value.kind() {
            ValueKind::Undefined | ValueKind::String => {
                return minijinja::escape_formatter(out, state, value)
            }
            _ => {}
        }
        if value.is_safe() {
            return minijinja::escape_formatter(out, state, value);
        }
        out.write_str(&py_str(value))
            .map_err(|_| JinjaError::new(ErrorKind::WriteFailure, "formatting failed"))
    });
    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: &Value| -> Value {
        if v.is_safe() || v.kind() == ValueKind::String {
            v.clone()
        } else {
            Value::from(py_str(v))
        }
    });
    env.add_filter("trim", |s: &str, chars: Option<&str>| -> String {
        match chars {
            Some(cs) => s
                .trim_matches(&cs.chars().collect::<Vec<_>>()[..])
                .to_string(),
            None => s.trim_matches(is_py_space).to_string(),
        }
    });
    env.add_filter("wordcount", |s: &str| -> usize {
        // jinja2: len(re.findall(r"\w+", s))
        s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .count()
    });
    env.add_filter("center", |s: &str, width: Option<usize>| -> String {
        // Python's str.center: the extra space goes left when the padding is odd and width is odd.
        let width = width.unwrap_or(80);
        let n = s.chars().count();
        if n >= width {
            return s.to_string();
        }
        let pad = width - n;
        let left = pad / 2 + (pad & width & 1);
        format!("{}{s}{}", " ".repeat(left), " ".repeat(pad - left))
    });
    // jinja2's `sequence` test is true for anything with a length and indexing (str, list, dict).
    env.add_test("sequence", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::String | ValueKind::Seq | ValueKind::Map
        )
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// The error `raise_exception` returns; found again in the error chain after rendering.
#[derive(Debug)]
struct Raised {
    message: String,
    message_index: Option<usize>,
}

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(state: &State, message: Option<Value>) -> Result<Value, JinjaError> {
    let message = message.map(|m| py_str(&m)).unwrap_or_default();
    let message_index = current_message_index(state);
    Err(
        JinjaError::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised {
            message,
            message_index,
        }),
    )
}

/// Which of `messages` the template is on: the loop variable `message` found in `messages`
/// (at `loop.index0` when that matches, else its first occurrence).
fn current_message_index(state: &State) -> Option<usize> {
    let messages = state.lookup("messages")?;
    let message = state.lookup("message").filter(|m| !m.is_undefined())?;
    let len = messages.len()?;
    if let Some(i) = state
        .lookup("loop")
        .and_then(|l| l.get_attr("index0").ok())
        .and_then(|i| i.as_usize())
    {
        if i < len && messages.get_item(&Value::from(i)).ok().as_ref() == Some(&message) {
            return Some(i);
        }
    }
    (0..len).find(|&i| messages.get_item(&Value::from(i)).ok().as_ref() == Some(&message))
}

// ---------------------------------------------------------------------------------------------
// Python-compatible methods
// ---------------------------------------------------------------------------------------------

/// Python's `str.isspace` set (what `str.split()` / `str.strip()` use).
fn is_py_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | '\x1c'..=' ' | '\u{85}' | '\u{a0}' | '\u{1680}')
        || matches!(
            c,
            '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}'
        )
        || matches!(c, '\u{205f}' | '\u{3000}')
}

fn method_error(msg: impl Into<String>) -> JinjaError {
    JinjaError::new(ErrorKind::InvalidOperation, msg.into())
}

fn unknown_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        if let Some(rv) = string_method(s, method, args)? {
            return Ok(rv);
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The string methods handled here (before falling back to pycompat); `None` if not one of them.
fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Option<Value>, JinjaError> {
    use minijinja::value::from_args;
    let chars_arg = |args: &[Value]| -> Result<Option<Vec<char>>, JinjaError> {
        let (chars,): (Option<Value>,) = from_args(args)?;
        match chars {
            None => Ok(None),
            Some(v) if v.is_none() => Ok(None),
            Some(v) => match v.as_str() {
                Some(c) => Ok(Some(c.chars().collect())),
                None => Err(method_error("strip arg must be None or str")),
            },
        }
    };
    let rv = match method {
        "strip" => Value::from(match chars_arg(args)? {
            Some(cs) => s.trim_matches(&cs[..]),
            None => s.trim_matches(is_py_space),
        }),
        "lstrip" => Value::from(match chars_arg(args)? {
            Some(cs) => s.trim_start_matches(&cs[..]),
            None => s.trim_start_matches(is_py_space),
        }),
        "rstrip" => Value::from(match chars_arg(args)? {
            Some(cs) => s.trim_end_matches(&cs[..]),
            None => s.trim_end_matches(is_py_space),
        }),
        "isspace" => {
            let () = from_args(args)?;
            Value::from(!s.is_empty() && s.chars().all(is_py_space))
        }
        "split" | "rsplit" => {
            let (sep, maxsplit): (Option<Value>, Option<i64>) = from_args(args)?;
            let sep = sep.filter(|v| !v.is_none());
            let sep = match &sep {
                Some(v) => Some(
                    v.as_str()
                        .ok_or_else(|| method_error("must be str or None"))?
                        .to_string(),
                ),
                None => None,
            };
            let maxsplit = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            let parts = py_split(s, sep.as_deref(), maxsplit, method == "rsplit")?;
            Value::from(parts)
        }
        "removeprefix" => {
            let (p,): (&str,) = from_args(args)?;
            Value::from(s.strip_prefix(p).unwrap_or(s))
        }
        "removesuffix" => {
            let (p,): (&str,) = from_args(args)?;
            Value::from(s.strip_suffix(p).unwrap_or(s))
        }
        "find" | "rfind" | "index" | "rindex" => {
            let (what,): (&str,) = from_args(args)?;
            let pos = if method.starts_with('r') {
                s.rfind(what)
            } else {
                s.find(what)
            };
            match pos {
                Some(b) => Value::from(s[..b].chars().count() as i64),
                None if method.ends_with("index") => {
                    return Err(method_error("substring not found"))
                }
                None => Value::from(-1i64),
            }
        }
        "zfill" => {
            let (width,): (usize,) = from_args(args)?;
            let n = s.chars().count();
            if n >= width {
                Value::from(s)
            } else {
                let (sign, rest) = match s.chars().next() {
                    Some(c @ ('+' | '-')) => (c.to_string(), &s[1..]),
                    _ => (String::new(), s),
                };
                Value::from(format!("{sign}{}{rest}", "0".repeat(width - n)))
            }
        }
        "casefold" => {
            let () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "swapcase" => {
            let () = from_args(args)?;
            let mut out = String::with_capacity(s.len());
            for c in s.chars() {
                if c.is_uppercase() {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
            }
            Value::from(out)
        }
        _ => return Ok(None),
    };
    Ok(Some(rv))
}

/// Python's `str.split` / `str.rsplit`.
fn py_split(
    s: &str,
    sep: Option<&str>,
    maxsplit: Option<usize>,
    from_right: bool,
) -> Result<Vec<String>, JinjaError> {
    let max = maxsplit.unwrap_or(usize::MAX);
    match sep {
        Some("") => Err(method_error("empty separator")),
        Some(sep) => {
            if from_right {
                let mut parts: Vec<String> = s
                    .rsplitn(max.saturating_add(1), sep)
                    .map(String::from)
                    .collect();
                parts.reverse();
                Ok(parts)
            } else {
                Ok(s.splitn(max.saturating_add(1), sep)
                    .map(String::from)
                    .collect())
            }
        }
        None => {
            // Runs of whitespace separate; no empty strings; the remainder keeps its inner spacing.
            let chars: Vec<(usize, char)> = s.char_indices().collect();
            let mut parts = Vec::new();
            if !from_right {
                let mut i = 0;
                while i < chars.len() {
                    while i < chars.len() && is_py_space(chars[i].1) {
                        i += 1;
                    }
                    if i >= chars.len() {
                        break;
                    }
                    if parts.len() == max {
                        parts.push(s[chars[i].0..].trim_end_matches(is_py_space).to_string());
                        break;
                    }
                    let start = chars[i].0;
                    while i < chars.len() && !is_py_space(chars[i].1) {
                        i += 1;
                    }
                    let end = chars.get(i).map_or(s.len(), |c| c.0);
                    parts.push(s[start..end].to_string());
                }
            } else {
                let mut i = chars.len();
                while i > 0 {
                    while i > 0 && is_py_space(chars[i - 1].1) {
                        i -= 1;
                    }
                    if i == 0 {
                        break;
                    }
                    let end = chars.get(i).map_or(s.len(), |c| c.0);
                    if parts.len() == max {
                        parts.push(s[..end].trim_start_matches(is_py_space).to_string());
                        break;
                    }
                    while i > 0 && !is_py_space(chars[i - 1].1) {
                        i -= 1;
                    }
                    parts.push(s[chars[i].0..end].to_string());
                }
                parts.reverse();
            }
            Ok(parts)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Python str()/repr() and json.dumps
// ---------------------------------------------------------------------------------------------

/// `float.__repr__`: shortest round-trip digits, scientific below 1e-4 and from 1e16.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
        let n = digits.len() as i32;
        let body = if exp >= 0 {
            if n <= exp + 1 {
                format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
            } else {
                let (a, b) = digits.split_at((exp + 1) as usize);
                format!("{a}.{b}")
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

fn as_float(v: &Value) -> Option<f64> {
    if v.kind() == ValueKind::Number && !v.is_integer() {
        f64::try_from(v.clone()).ok()
    } else {
        None
    }
}

/// Python's `str(value)` for template values.
fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => py_repr(v),
    }
}

/// Python's `repr(value)` for template values (lists and dicts print their items this way).
fn py_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => match as_float(v) {
            Some(f) => py_float_repr(f),
            None => v.to_string(),
        },
        ValueKind::String => py_repr_str(v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => match v.try_iter() {
            Ok(it) => {
                let items: Vec<String> = it.map(|x| py_repr(&x)).collect();
                format!("[{}]", items.join(", "))
            }
            Err(_) => v.to_string(),
        },
        ValueKind::Map => match v.as_object().and_then(|o| o.try_iter_pairs()) {
            Some(pairs) => {
                let items: Vec<String> = pairs
                    .map(|(k, x)| format!("{}: {}", py_repr(&k), py_repr(&x)))
                    .collect();
                format!("{{{}}}", items.join(", "))
            }
            None => v.to_string(),
        },
        _ => v.to_string(),
    }
}

/// `repr(str)`: single quotes unless the text has `'` and no `"`.
fn py_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
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
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// i.e. `json.dumps` with those arguments (positional or keyword).
fn tojson(value: &Value, args: &[Value], kwargs: Kwargs) -> Result<Value, JinjaError> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(method_error("tojson takes at most 4 positional arguments"));
    }
    let mut opt: [Option<Value>; 4] = Default::default();
    for (i, a) in args.iter().enumerate() {
        opt[i] = Some(a.clone());
    }
    for (i, name) in NAMES.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if opt[i].is_some() {
                return Err(method_error(format!(
                    "tojson got multiple values for argument '{name}'"
                )));
            }
            opt[i] = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = opt;
    let ensure_ascii = ensure_ascii.is_some_and(|v| v.is_true());
    let sort_keys = sort_keys.is_some_and(|v| v.is_true());
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => {
                let n = if v.kind() == ValueKind::Bool {
                    i64::from(v.is_true())
                } else {
                    v.as_i64()
                        .ok_or_else(|| method_error("tojson indent must be an int or a string"))?
                };
                " ".repeat(n.max(0) as usize)
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => return Err(method_error("tojson separators must be a pair of strings")),
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    json_dump(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

fn json_newline(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_dump(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), JinjaError> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match as_float(v) {
            Some(f) if f.is_nan() => out.push_str("NaN"),
            Some(f) if f.is_infinite() => {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
            }
            Some(f) => out.push_str(&py_float_repr(f)),
            None => out.push_str(&v.to_string()),
        },
        ValueKind::String => json_str(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_dump(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let Some(pairs) = v.as_object().and_then(|o| o.try_iter_pairs()) else {
                return Err(method_error(format!(
                    "Object of type {} is not JSON serializable",
                    v.kind()
                )));
            };
            let mut entries: Vec<(String, Value)> = Vec::new();
            for (k, x) in pairs {
                entries.push((json_key(&k)?, x));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                json_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                json_dump(x, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push('}');
        }
        _ => {
            return Err(method_error(format!(
                "Object of type {} is not JSON serializable",
                v.kind()
            )))
        }
    }
    Ok(())
}

/// A dict key as `json.dumps` writes it (non-string scalar keys are converted).
fn json_key(k: &Value) -> Result<String, JinjaError> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number => match as_float(k) {
            Some(f) if f.is_nan() => "NaN".into(),
            Some(f) if f.is_infinite() => if f > 0.0 { "Infinity" } else { "-Infinity" }.into(),
            Some(f) => py_float_repr(f),
            None => k.to_string(),
        },
        other => {
            return Err(method_error(format!(
                "keys must be str, int, float, bool or None, not {other}"
            )))
        }
    })
}

/// A JSON string literal as `json.dumps` writes it.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
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

// ---------------------------------------------------------------------------------------------
// strftime_now
// ---------------------------------------------------------------------------------------------

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `datetime.now().strftime(format)`, on the UTC clock.
fn strftime_now(format: &str) -> Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(format, secs)))
}

/// Civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A `strftime` subset (`%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %h %B %w %u %F %T %D %R %%`)
/// for `secs` seconds after the Unix epoch, UTC.
fn strftime(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let jan1 = {
        // days since epoch of January 1st of `y`
        let mut lo = days - 366;
        while civil_from_days(lo).0 < y {
            lo += 1;
        }
        lo
    };
    let yday = days - jan1 + 1;
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match spec {
            'Y' => write!(out, "{y}"),
            'y' => write!(out, "{:02}", y.rem_euclid(100)),
            'm' => write!(out, "{m:02}"),
            'd' => write!(out, "{d:02}"),
            'e' => write!(out, "{d:>2}"),
            'j' => write!(out, "{yday:03}"),
            'H' => write!(out, "{hh:02}"),
            'I' => write!(out, "{h12:02}"),
            'M' => write!(out, "{mm:02}"),
            'S' => write!(out, "{ss:02}"),
            'p' => write!(out, "{}", if hh < 12 { "AM" } else { "PM" }),
            'a' => write!(out, "{}", &DAYS[weekday][..3]),
            'A' => write!(out, "{}", DAYS[weekday]),
            'b' | 'h' => write!(out, "{}", &MONTHS[m as usize - 1][..3]),
            'B' => write!(out, "{}", MONTHS[m as usize - 1]),
            'w' => write!(out, "{}", (weekday + 1) % 7),
            'u' => write!(out, "{}", weekday + 1),
            'F' => write!(out, "{y}-{m:02}-{d:02}"),
            'T' => write!(out, "{hh:02}:{mm:02}:{ss:02}"),
            'R' => write!(out, "{hh:02}:{mm:02}"),
            'D' => write!(out, "{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e20, "1e+20"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0.0"),
            (123.456, "123.456"),
            (-2.5e300, "-2.5e+300"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC was a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %p %I %y %%", t),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 PM 01 24 %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
    }

    #[test]
    fn python_split() {
        let f = |s: &str, sep: Option<&str>, max: Option<usize>, r: bool| {
            py_split(s, sep, max, r).unwrap()
        };
        assert_eq!(f("  a  b c ", None, None, false), ["a", "b", "c"]);
        assert_eq!(f("  a  b c ", None, Some(1), false), ["a", "b c"]);
        assert_eq!(f("  a  b c ", None, Some(1), true), ["a  b", "c"]);
        assert_eq!(f("a,b,,c", Some(","), None, false), ["a", "b", "", "c"]);
        assert_eq!(f("a,b,,c", Some(","), Some(1), true), ["a,b,", "c"]);
        assert_eq!(f("", None, None, false), Vec::<String>::new());
        assert_eq!(f("", Some(","), None, false), [""]);
    }
}
