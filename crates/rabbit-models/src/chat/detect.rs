//! Which chat format a model directory has: its `chat_template` when it ships one, else the
//! built-in format its `tokenizer_class` (and generation_config.json) name.
//!
//! The rule for [`BuiltinFormat::detect`], from `tokenizer_config.json`'s `tokenizer_class`:
//!
//! * `QWenTokenizer`: generation_config.json's `chat_format` — `"chatml"` (the Chat checkpoints)
//!   gives [`BuiltinFormat::QwenChatml`] with its `max_window_size` (6144, make_context's default,
//!   when absent); `"raw"` (the base checkpoints, which QWen's chat() refuses), another value, or
//!   no `chat_format` is [`ChatError::NotAChatModel`].
//! * `ChatGLMTokenizer` (ChatGLM2 and ChatGLM3 share the class, the sentencepiece file, and
//!   config.json / tokenizer_config.json up to their names): the checkpoint's own
//!   `tokenization_chatglm.py` decides when present — ChatGLM3's registers the role token
//!   `<|user|>`, ChatGLM2's does not; without it, `name_or_path` of tokenizer_config.json, then
//!   `_name_or_path` of config.json, naming `chatglm3` or `chatglm2` (the THUDM checkpoints set
//!   both). Neither: [`ChatError::NotAChatModel`].
//! * `BaichuanTokenizer`: generation_config.json's `user_token_id` and `assistant_token_id`
//!   (missing: [`ChatError::NotAChatModel`]), with config.json's `model_max_length` and
//!   generation_config.json's `max_new_tokens` for the history cut.
//! * anything else (InternLM2 ships a `chat_template`; InternLM v1, Llama-likes): `Ok(None)`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::builtin::{QWEN_DEFAULT_MAX_WINDOW_SIZE, QWEN_DEFAULT_SYSTEM};
use super::{BuiltinFormat, ChatError, ChatTemplate};

/// A model's chat prompt format: its Jinja template, or a format built into its family's code.
#[derive(Debug)]
pub enum ChatFormat {
    /// The `chat_template` of tokenizer_config.json (or chat_template.jinja).
    Template(Box<ChatTemplate>),
    /// A remote-code family's built-in format (the checkpoint has no template).
    Builtin(BuiltinFormat),
}

/// The turn-end tokens a family's own `chat()` stops on besides its eos ids, for a checkpoint
/// that renders with its template: InternLM2's adds `<|im_end|>` (its generation_config.json
/// names only `</s>`). By `tokenizer_class` in tokenizer_config.json; none when unknown.
pub fn template_stop_tokens(dir: &Path) -> Vec<&'static str> {
    let class = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("tokenizer_class")?.as_str().map(str::to_string));
    match class.as_deref() {
        Some("InternLM2Tokenizer") | Some("InternLM2TokenizerFast") => vec!["<|im_end|>"],
        _ => vec![],
    }
}

impl ChatFormat {
    /// The chat format of the model in `dir`: [`ChatTemplate::from_tokenizer_config`] when it
    /// finds a template, else [`BuiltinFormat::detect`]. `Ok(None)`: neither (not a chat model).
    pub fn from_model_dir(dir: &Path) -> Result<Option<ChatFormat>, ChatError> {
        if let Some(t) = ChatTemplate::from_tokenizer_config(dir)? {
            return Ok(Some(ChatFormat::Template(Box::new(t))));
        }
        Ok(BuiltinFormat::detect(dir)?.map(ChatFormat::Builtin))
    }
}

/// A JSON object file: `Ok(None)` when absent.
fn read_object(path: &Path) -> Result<Option<Map<String, Value>>, ChatError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ChatError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(ChatError::BadConfig {
            path: path.to_path_buf(),
            reason: "expected a JSON object".into(),
        }),
        Err(source) => Err(ChatError::Json {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `map[key]` as a non-negative integer; `None` when absent or null.
fn uint(path: &Path, map: &Map<String, Value>, key: &str) -> Result<Option<u64>, ChatError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| ChatError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("\"{key}\" must be a non-negative integer, found {v}"),
        }),
    }
}

fn not_chat(path: PathBuf, reason: String) -> ChatError {
    ChatError::NotAChatModel { path, reason }
}

impl BuiltinFormat {
    /// The built-in format of the model in `dir`, chosen by the rule in this module's docs.
    /// Call it when the directory has no `chat_template` (as [`ChatFormat::from_model_dir`]
    /// does). `Ok(None)`: the family has no built-in format; [`ChatError::NotAChatModel`]: it
    /// has one, but the files say this checkpoint cannot use it.
    pub fn detect(dir: &Path) -> Result<Option<BuiltinFormat>, ChatError> {
        let tc_path = dir.join("tokenizer_config.json");
        let Some(tc) = read_object(&tc_path)? else {
            return Ok(None);
        };
        let class = match tc.get("tokenizer_class") {
            Some(Value::String(s)) => s.as_str(),
            _ => return Ok(None),
        };
        let gen_path = dir.join("generation_config.json");
        match class {
            "QWenTokenizer" => {
                let gen = read_object(&gen_path)?;
                let format = gen.as_ref().and_then(|g| g.get("chat_format"));
                match format {
                    Some(Value::String(f)) if f == "chatml" => {}
                    Some(Value::String(f)) if f == "raw" => return Err(not_chat(
                        gen_path,
                        "chat_format is \"raw\": a base checkpoint (QWen's chat() accepts only \"chatml\"); use a plain prompt".into(),
                    )),
                    Some(other) => return Err(not_chat(
                        gen_path,
                        format!("chat_format {other} is not one QWen's code knows (\"chatml\", \"raw\")"),
                    )),
                    None => return Err(not_chat(
                        gen_path,
                        "no chat_format (QWenTokenizer models say \"chatml\" for Chat checkpoints there): which prompt format applies is unknown".into(),
                    )),
                }
                let gen = gen.expect("chat_format was read from it");
                let window = uint(&gen_path, &gen, "max_window_size")?
                    .map_or(QWEN_DEFAULT_MAX_WINDOW_SIZE, |w| w as usize);
                Ok(Some(BuiltinFormat::QwenChatml {
                    default_system: QWEN_DEFAULT_SYSTEM.into(),
                    max_window_size: window,
                }))
            }
            "ChatGLMTokenizer" => chatglm_version(dir, &tc_path, &tc).map(Some),
            "BaichuanTokenizer" => {
                let Some(gen) = read_object(&gen_path)? else {
                    return Err(not_chat(
                        gen_path,
                        "missing: Baichuan's chat prompt takes user_token_id / assistant_token_id from it".into(),
                    ));
                };
                let id = |key: &str| -> Result<u32, ChatError> {
                    let v = uint(&gen_path, &gen, key)?.ok_or_else(|| {
                        not_chat(gen_path.clone(), format!("no \"{key}\": Baichuan's chat prompt needs it (a base checkpoint?)"))
                    })?;
                    u32::try_from(v).map_err(|_| ChatError::BadConfig {
                        path: gen_path.clone(),
                        reason: format!("\"{key}\" {v} is not a token id"),
                    })
                };
                let (user_token_id, assistant_token_id) =
                    (id("user_token_id")?, id("assistant_token_id")?);
                let cfg_path = dir.join("config.json");
                let model_max_length = match read_object(&cfg_path)? {
                    Some(c) => uint(&cfg_path, &c, "model_max_length")?.map(|v| v as usize),
                    None => None,
                };
                let max_new_tokens = uint(&gen_path, &gen, "max_new_tokens")?.map(|v| v as usize);
                Ok(Some(BuiltinFormat::Baichuan2 {
                    user_token_id,
                    assistant_token_id,
                    model_max_length,
                    max_new_tokens,
                }))
            }
            _ => Ok(None),
        }
    }
}

/// ChatGLM3 or ChatGLM2, by the checkpoint's tokenizer code, else by its name.
fn chatglm_version(
    dir: &Path,
    tc_path: &Path,
    tc: &Map<String, Value>,
) -> Result<BuiltinFormat, ChatError> {
    let code_path = dir.join("tokenization_chatglm.py");
    match std::fs::read_to_string(&code_path) {
        Ok(code) => {
            return Ok(if code.contains("<|user|>") {
                BuiltinFormat::ChatGlm3
            } else {
                BuiltinFormat::ChatGlm2
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ChatError::Io {
                path: code_path,
                source,
            })
        }
    }
    let cfg_path = dir.join("config.json");
    let cfg = read_object(&cfg_path)?;
    let names = [
        (tc_path.to_path_buf(), tc.get("name_or_path")),
        (cfg_path, cfg.as_ref().and_then(|c| c.get("_name_or_path"))),
    ];
    for (path, name) in names {
        let Some(Value::String(name)) = name else {
            continue;
        };
        let lower = name.to_lowercase();
        match (lower.contains("chatglm3"), lower.contains("chatglm2")) {
            (true, false) => return Ok(BuiltinFormat::ChatGlm3),
            (false, true) => return Ok(BuiltinFormat::ChatGlm2),
            (true, true) => {
                return Err(not_chat(
                    path,
                    format!("the name {name:?} names both chatglm2 and chatglm3"),
                ))
            }
            (false, false) => {}
        }
    }
    Err(not_chat(
        dir.to_path_buf(),
        "a ChatGLMTokenizer checkpoint, but neither tokenization_chatglm.py nor a name_or_path / _name_or_path naming chatglm2 or chatglm3 says whether it is ChatGLM2 or ChatGLM3 (their prompt formats differ); add the checkpoint's tokenization_chatglm.py".into(),
    ))
}
