//! A loaded model's chat format and the ids its answers stop at: what `rabbit chat`,
//! `rabbit generate --chat` and `rabbit serve` all render conversations with.

use std::path::Path;

use rabbit_models::chat::ChatFormat;

use crate::error::{Error, Result};
use crate::model::Model;

/// The chat format of the checkpoint in `dir` (its template, or its family's built-in one), or
/// an error saying why none can be built.
pub fn format_of(dir: &Path) -> Result<ChatFormat> {
    match ChatFormat::from_model_dir(dir)? {
        Some(f) => Ok(f),
        None => Err(Error::InvalidInput(format!(
            "{} has no chat_template in tokenizer_config.json, and its tokenizer class ({}) has \
             no built-in chat format: no chat prompt can be built for it",
            dir.display(),
            tokenizer_class(dir).unwrap_or_else(|| "none".into())
        ))),
    }
}

/// `tokenizer_class` of the model's tokenizer_config.json, for messages.
fn tokenizer_class(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("tokenizer_class")?.as_str().map(str::to_string)
}

impl Model {
    /// The model's chat format: a template's rendering capped at what could still fit the
    /// model's context (a longer prompt is refused anyway, so a runaway template stops early);
    /// a built-in format keeps room for `max_new_tokens` as its family's chat() does
    /// (Baichuan).
    pub fn chat_format(&self, max_new_tokens: usize) -> Result<ChatFormat> {
        Ok(match format_of(self.model_dir())? {
            ChatFormat::Template(t) => {
                ChatFormat::Template(Box::new(t.with_max_rendered_bytes(self.max_text_bytes()?)))
            }
            ChatFormat::Builtin(f) => ChatFormat::Builtin(f.with_max_new_tokens(max_new_tokens)),
        })
    }

    /// The ids an answer stops at: the model's eos ids, plus the turn markers a built-in
    /// format's chat() also stops on (QWen's `<|im_end|>`, ChatGLM3's `<|user|>`) or a
    /// template's generation config names.
    pub fn chat_stop_ids(&self, format: &ChatFormat) -> Vec<u32> {
        let mut ids = self.engine.spec().eos_token_ids.clone();
        let extra = match format {
            ChatFormat::Builtin(f) => f.stop_tokens().to_vec(),
            ChatFormat::Template(_) => rabbit_models::chat::template_stop_tokens(self.model_dir()),
        };
        if let Some(tok) = self.tokenizer() {
            ids.extend(extra.iter().filter_map(|t| tok.token_to_id(t)));
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Whether `format` takes a system message (a built-in format may not).
pub fn takes_system(format: &ChatFormat) -> bool {
    match format {
        ChatFormat::Builtin(f) => f.takes_system(),
        ChatFormat::Template(_) => true,
    }
}
