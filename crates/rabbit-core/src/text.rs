//! Text ↔ token ids through the model's `tokenizer.json` (the `tokenizers` crate, pure-Rust
//! fancy-regex backend).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{CoreError, Result};

/// Loads `<dir>/tokenizer.json` if present.
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| CoreError::Tokenizer(format!("{}: {e}", path.display())))
}

/// Text → ids, without adding BOS/EOS (the Qwen/Llama chat templates carry their own).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| CoreError::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// Ids → text, skipping special tokens.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| CoreError::Tokenizer(e.to_string()))
}
