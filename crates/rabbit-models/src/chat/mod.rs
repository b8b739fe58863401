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
//!
//! Checkpoints without a template whose family builds its prompt in Python (QWen v1 Chat,
//! ChatGLM2/3, Baichuan 2 Chat) get a [`BuiltinFormat`] instead, token-level and exact to the
//! original code; [`ChatFormat::from_model_dir`] picks the template or that format
//! (`builtin.rs`, `detect.rs`).
//!
//! Unlike jinja2, a render is bounded: its output stops at
//! [`ChatTemplate::max_rendered_bytes`] ([`ChatError::RenderTooLarge`]) and its instruction count
//! at an allowance that grows with the input ([`ChatError::RenderTooLong`]), so a template that
//! loops without end fails fast. Strings a template builds in variables without printing them
//! (`~` doubling a string) are not bounded by either: minijinja offers no limit there.

mod builtin;
mod detect;
mod environment;
mod limits;
mod load;
mod preprocess;
mod pyrepr;
mod pystr;
mod strftime;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

pub use builtin::{
    BuiltinFormat, EncodeError, PromptEncoder, QWEN_DEFAULT_MAX_WINDOW_SIZE, QWEN_DEFAULT_SYSTEM,
};
pub use detect::{template_stop_tokens, ChatFormat};
pub use limits::DEFAULT_MAX_RENDERED_BYTES;
pub use load::load_messages;

use environment::{environment, Raised};
use limits::{fuel_for, BoundedOutput};
use load::{special_token, template_from_config};
use preprocess::preprocess;

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
    /// The rendered text would exceed [`ChatTemplate::max_rendered_bytes`]: the conversation is
    /// too long for the model, or the template produces text without end.
    #[error(
        "{origin} rendered more than {limit} bytes, the limit for one prompt: the conversation is too long for the model's context, or the template does not stop"
    )]
    RenderTooLarge {
        /// Where the template came from.
        origin: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The checkpoint's files name a family with a built-in prompt format, but not one that
    /// can be used (a base model's `chat_format`, ids missing, ChatGLM2 vs ChatGLM3 undecidable).
    #[error("{}: {reason}", path.display())]
    NotAChatModel {
        /// The file that decided it (or the directory).
        path: PathBuf,
        /// Why, naming the field.
        reason: String,
    },
    /// A built-in prompt format cannot express this conversation (its roles or their order).
    #[error("{format}: {reason}")]
    BadConversation {
        /// The format ([`BuiltinFormat::name`]).
        format: &'static str,
        /// What is wrong, naming the message (`message 2: ...`).
        reason: String,
    },
    /// The tokenizer failed on a piece of a built-in prompt.
    #[error("{format}: the tokenizer failed: {source}")]
    Encode {
        /// The format ([`BuiltinFormat::name`]).
        format: &'static str,
        /// The tokenizer's error.
        source: builtin::EncodeError,
    },
    /// The tokenizer lacks a special token a built-in prompt format needs.
    #[error("{format}: the tokenizer has no token {token:?}, which this prompt format needs")]
    UnknownToken {
        /// The format ([`BuiltinFormat::name`]).
        format: &'static str,
        /// The token's string.
        token: String,
    },
    /// The template executed more instructions than a render of this input may (a loop that
    /// does not end, or one far too large for the conversation).
    #[error(
        "{origin} did not finish rendering within {instructions} template instructions (the allowance for {messages} message(s)): the template loops without end or does far too much work"
    )]
    RenderTooLong {
        /// Where the template came from.
        origin: String,
        /// The instruction allowance that ran out.
        instructions: u64,
        /// Messages in the conversation.
        messages: usize,
    },
}

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    special_tokens: Vec<(String, String)>,
    max_rendered_bytes: usize,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .field("source_len", &self.source.len())
            .field("max_rendered_bytes", &self.max_rendered_bytes)
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
            max_rendered_bytes: DEFAULT_MAX_RENDERED_BYTES,
        })
    }

    /// The same template with rendering capped at `max_bytes` of output (default
    /// [`DEFAULT_MAX_RENDERED_BYTES`]): a render that would produce more stops as soon as it
    /// crosses the limit, with [`ChatError::RenderTooLarge`], having held at most `max_bytes`.
    ///
    /// Derive it from the context the prompt must fit in: byte-level BPE tokens are at least one
    /// byte and at most the tokenizer's longest token, so a prompt of `context_tokens` tokens is
    /// at most `context_tokens × longest_token_bytes` bytes (use `saturating_mul`); anything
    /// longer cannot fit, and is refused before the tokenizer sees it.
    pub fn with_max_rendered_bytes(mut self, max_bytes: usize) -> ChatTemplate {
        self.max_rendered_bytes = max_bytes;
        self
    }

    /// The most bytes a render may produce (see [`with_max_rendered_bytes`](Self::with_max_rendered_bytes)).
    pub fn max_rendered_bytes(&self) -> usize {
        self.max_rendered_bytes
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
    ///
    /// Bounded: at most [`max_rendered_bytes`](Self::max_rendered_bytes) of output
    /// ([`ChatError::RenderTooLarge`] past it) and a number of template instructions
    /// proportional to the input ([`ChatError::RenderTooLong`] past it), so a template that
    /// loops without end fails quickly instead of exhausting memory or hanging.
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

        // Fuel is an environment setting; a clone (shared, reference-counted parts) carries this
        // render's allowance without making `render` take `&mut self`.
        let instructions = fuel_for(messages, kwargs);
        let mut env = self.env.clone();
        env.set_fuel(Some(instructions));
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added at construction");
        let mut out = BoundedOutput::new(self.max_rendered_bytes);
        // The captured state borrows the environment; only success or the error is needed.
        let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
        match rendered {
            Ok(()) => Ok(out.into_string()),
            Err(_) if out.overflowed() => Err(ChatError::RenderTooLarge {
                origin: self.origin.clone(),
                limit: self.max_rendered_bytes,
            }),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ChatError::RenderTooLong {
                origin: self.origin.clone(),
                instructions,
                messages: messages.len(),
            }),
            Err(e) => Err(self.render_error(e)),
        }
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
