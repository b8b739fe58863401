//! Reading templates and conversations from disk: `tokenizer_config.json`'s `chat_template` and
//! special tokens, and messages files.

use std::path::Path;

use super::{ChatError, Message};

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
pub(super) fn special_token(
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
pub(super) fn template_from_config(
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
