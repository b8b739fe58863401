//! Per `tokenizer_class`: which special tokens exist, at which ids, which of them are recognised in
//! text, and what `add_special_tokens=True` puts around the text — as the original Python classes
//! (tokenization_chatglm.py, tokenization_baichuan.py, tokenization_internlm{,2}.py) do.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::sentencepiece::SpModel;
use super::{tk_err, TokenizerError};

/// The `tokenizer_class`es a `tokenizer.model` is converted for (`QWenTokenizer` goes with
/// `qwen.tiktoken`).
pub const SUPPORTED_CLASSES: &[&str] = &[
    "ChatGLMTokenizer",
    "BaichuanTokenizer",
    "InternLMTokenizer",
    "InternLM2Tokenizer",
    "QWenTokenizer",
];

/// ChatGLM's specials after the sentencepiece vocabulary (SPTokenizer in tokenization_chatglm.py).
const GLM_SPECIALS: &[&str] = &["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"];
/// ChatGLM3's role tokens, after [`GLM_SPECIALS`].
const GLM3_ROLES: &[&str] = &["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"];

/// `tokenizer_config.json`, as far as the conversion reads it.
pub(crate) struct TokenizerConfig {
    path: PathBuf,
    map: Map<String, Value>,
}

impl TokenizerConfig {
    /// Reads `<dir>/tokenizer_config.json`; `None` when absent.
    pub(crate) fn read(dir: &Path) -> Result<Option<TokenizerConfig>, TokenizerError> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| TokenizerError::Io {
            path: path.clone(),
            source,
        })?;
        let map = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(corrupt(&path, "top level", "not a JSON object")),
            Err(e) => {
                let at = format!("line {} column {}", e.line(), e.column());
                return Err(corrupt(&path, &at, &e.to_string()));
            }
        };
        Ok(Some(TokenizerConfig { path, map }))
    }

    fn class(&self) -> Result<&str, TokenizerError> {
        match self.map.get("tokenizer_class") {
            Some(Value::String(s)) => Ok(s),
            None => Err(self.unsupported(
                "tokenizer_class",
                "missing: which tokenizer class applies is unknown",
            )),
            Some(_) => Err(self.unsupported("tokenizer_class", "not a string")),
        }
    }

    /// Refuses a `tokenizer_class` other than `allowed`.
    pub(crate) fn expect_class(&self, allowed: &[&str]) -> Result<(), TokenizerError> {
        let class = self.class()?;
        if allowed.contains(&class) {
            return Ok(());
        }
        Err(self.unsupported(
            "tokenizer_class",
            &format!(
                "`{class}` does not go with this vocabulary file (expected {})",
                allowed.join(" or ")
            ),
        ))
    }

    /// Refuses a class whose `tokenizer.model` is not converted from sentencepiece.
    pub(crate) fn expect_sentencepiece_class(&self) -> Result<(), TokenizerError> {
        let class = self.class()?;
        if SUPPORTED_CLASSES[..4].contains(&class) {
            return Ok(());
        }
        Err(self.unsupported(
            "tokenizer_class",
            &format!(
                "`{class}` is not converted from tokenizer.model (supported: {}); a tokenizer.json for the model would be used instead",
                SUPPORTED_CLASSES[..4].join(", ")
            ),
        ))
    }

    fn unsupported(&self, field: &str, reason: &str) -> TokenizerError {
        TokenizerError::Unsupported {
            path: self.path.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool, TokenizerError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(corrupt(&self.path, key, "not a boolean")),
        }
    }

    /// A token field: a string or an `AddedToken` object (`content`, `single_word`, ...).
    fn token(
        &self,
        key: &str,
        default: Option<&str>,
    ) -> Result<Option<AddedToken>, TokenizerError> {
        match self.map.get(key) {
            None => Ok(default.map(|d| AddedToken::from(d.to_string(), true))),
            Some(Value::Null) => Ok(None),
            Some(v) => added_token(&self.path, key, v, true).map(Some),
        }
    }

    /// Refuses settings whose effect the conversion would silently drop.
    fn refuse_unconverted(&self) -> Result<(), TokenizerError> {
        if self.bool("clean_up_tokenization_spaces", false)? {
            return Err(self.unsupported(
                "clean_up_tokenization_spaces",
                "true is not converted (decoding would keep the spaces Python removes)",
            ));
        }
        if self.bool("encode_special_tokens", false)? {
            return Err(self.unsupported(
                "encode_special_tokens",
                "true is not converted (ChatGLM3 would split its role tokens out of text)",
            ));
        }
        match self.map.get("sp_model_kwargs") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(_) => {
                return Err(self.unsupported(
                    "sp_model_kwargs",
                    "sentencepiece options (sampling, ...) are not converted",
                ))
            }
        }
        Ok(())
    }
}

fn corrupt(path: &Path, at: &str, reason: &str) -> TokenizerError {
    TokenizerError::Corrupt {
        path: path.to_path_buf(),
        at: at.into(),
        reason: reason.into(),
    }
}

fn added_token(
    path: &Path,
    key: &str,
    v: &Value,
    special: bool,
) -> Result<AddedToken, TokenizerError> {
    match v {
        Value::String(s) => Ok(AddedToken::from(s.clone(), special)),
        Value::Object(o) => {
            let content = o
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| corrupt(path, key, "an added token needs a string `content`"))?;
            let flag = |k: &str, d: bool| o.get(k).and_then(Value::as_bool).unwrap_or(d);
            let special = flag("special", special);
            // `single_word` is not honoured by Python's slow tokenizers (Baichuan sets it, and
            // transformers still splits `glued<s>text`), so it is not set here either.
            Ok(AddedToken::from(content.to_string(), special)
                .lstrip(flag("lstrip", false))
                .rstrip(flag("rstrip", false))
                // Python's slow tokenizers split these out of the raw text.
                .normalized(false))
        }
        _ => Err(corrupt(path, key, "not a string or an added-token object")),
    }
}

/// Builds the tokenizer of `sp` for `cfg`'s class; returns it and the class.
pub(crate) fn sentencepiece_tokenizer(
    path: &Path,
    sp: &SpModel,
    cfg: &TokenizerConfig,
) -> Result<(Tokenizer, String), TokenizerError> {
    let class = cfg.class()?.to_string();
    cfg.refuse_unconverted()?;
    let tok = match class.as_str() {
        "ChatGLMTokenizer" => chatglm(path, sp)?,
        "BaichuanTokenizer" | "InternLMTokenizer" | "InternLM2Tokenizer" => {
            llama_like(path, sp, cfg, &class)?
        }
        "QWenTokenizer" => {
            return Err(cfg.unsupported(
                "tokenizer_class",
                "QWenTokenizer reads qwen.tiktoken, which this directory lacks",
            ))
        }
        other => {
            return Err(cfg.unsupported(
                "tokenizer_class",
                &format!(
                    "`{other}` is not converted from tokenizer.model (supported: {})",
                    SUPPORTED_CLASSES[..4].join(", ")
                ),
            ))
        }
    };
    Ok((tok, class))
}

/// ChatGLM2/3: specials after the sp vocabulary, never recognised in text (the Python class
/// only inserts them by id); `[gMASK] sop` before the text. ChatGLM3's file (the role tokens)
/// is told from ChatGLM2's by nothing in the config; the role ids sit right after `eop`, so
/// both sets are registered: ChatGLM2 never produces ids past `eop`.
fn chatglm(path: &Path, sp: &SpModel) -> Result<Tokenizer, TokenizerError> {
    let n = sp.pieces.len() as u32;
    let names: Vec<&str> = GLM_SPECIALS.iter().chain(GLM3_ROLES).copied().collect();
    let mut extra: Vec<AddedToken> = names
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true).normalized(false))
        .collect();
    // The class decodes its unk/bos/eos (and pad = unk) ids to "" (`convert_id_to_token`):
    // special, so decoding skips them. They keep their piece ids, and text never produces them
    // (special tokens are not read out of text, below).
    for id in [sp.unk_id, sp.bos_id, sp.eos_id] {
        if let Some(i) = sp.special_id(id) {
            extra.push(
                AddedToken::from(sp.pieces[i as usize].piece.clone(), true).normalized(false),
            );
        }
    }
    let mut tok = sp.tokenizer(&extra, false)?;
    for (i, s) in names.iter().enumerate() {
        if tok.token_to_id(s) != Some(n + i as u32) {
            return Err(TokenizerError::Unsupported {
                path: path.to_path_buf(),
                field: format!("piece {s:?}"),
                reason: format!("ChatGLM's special {s} (id {}) is also a sentencepiece piece; one string cannot have both ids", n + i as u32),
            });
        }
    }
    let eos = sp
        .special_id(sp.eos_id)
        .ok_or_else(|| corrupt(path, "trainer_spec.eos_id", "ChatGLM needs an EOS piece"))?;
    let eos_piece = sp.pieces[eos as usize].piece.clone();
    let post = TemplateProcessing::builder()
        .try_single("[gMASK] sop $A")
        .and_then(|b| b.try_pair(format!("[gMASK] sop $A $B {eos_piece}")))
        .map_err(|e| tk_err(path, e))?
        .special_tokens(vec![
            ("[gMASK]".to_string(), n + 1),
            ("sop".to_string(), n + 3),
            (eos_piece, eos),
        ])
        .build()
        .map_err(|e| tk_err(path, e))?;
    tok.with_post_processor(Some(post));
    // Python never reads a special token out of text: plain `encode` must not either.
    tok.set_encode_special_tokens(true);
    Ok(tok)
}

/// Baichuan / InternLM / InternLM2: bos/eos/unk/pad and `added_tokens_decoder` recognised in
/// text; BOS/EOS per `add_bos_token` / `add_eos_token` (class defaults: BOS on, EOS off).
fn llama_like(
    path: &Path,
    sp: &SpModel,
    cfg: &TokenizerConfig,
    class: &str,
) -> Result<Tokenizer, TokenizerError> {
    let pad_default = if class == "BaichuanTokenizer" {
        None
    } else {
        Some("</s>")
    };
    let mut extra: Vec<(AddedToken, Option<u32>)> = Vec::new();
    let mut named = Vec::new();
    for (key, default) in [
        ("bos_token", Some("<s>")),
        ("eos_token", Some("</s>")),
        ("unk_token", Some("<unk>")),
        ("pad_token", pad_default),
    ] {
        let t = cfg.token(key, default)?;
        named.push(t.as_ref().map(|t| t.content.clone()));
        if let Some(t) = t {
            extra.push((t, None));
        }
    }
    if let Some(v) = cfg.map.get("added_tokens_decoder") {
        let Value::Object(m) = v else {
            return Err(corrupt(&cfg.path, "added_tokens_decoder", "not an object"));
        };
        let mut entries = Vec::new();
        for (id, t) in m {
            let key = format!("added_tokens_decoder.{id}");
            let id: u32 = id
                .parse()
                .map_err(|_| corrupt(&cfg.path, &key, "the key is not a token id"))?;
            entries.push((added_token(&cfg.path, &key, t, false)?, Some(id)));
        }
        entries.sort_by_key(|(_, id)| *id);
        extra.extend(entries);
    }
    // One entry per string (the config names bos/eos again in added_tokens_decoder).
    let mut unique: Vec<(AddedToken, Option<u32>)> = Vec::new();
    for (t, id) in extra {
        match unique.iter_mut().find(|(u, _)| u.content == t.content) {
            Some(u) => u.1 = u.1.or(id),
            None => unique.push((t, id)),
        }
    }
    let tokens: Vec<AddedToken> = unique.iter().map(|(t, _)| t.clone()).collect();
    // InternLM's convert_tokens_to_string always ends with clean_up_tokenization.
    let tok = sp.tokenizer(&tokens, class.starts_with("InternLM"))?;
    // A string that is a piece keeps the piece's id; one past the vocabulary gets the next id,
    // which must be the id the config gives it.
    for (t, id) in &unique {
        let got = tok.token_to_id(&t.content);
        let want = sp.id_of(&t.content).or(*id);
        if want.is_some() && got != want {
            let key = format!(
                "added_tokens_decoder.{}",
                id.map_or("?".to_string(), |i| i.to_string())
            );
            return Err(corrupt(&cfg.path, &key, &format!(
                "{:?} would get id {} (a piece of tokenizer.model has {:?}; tokens past the vocabulary must follow it in order)",
                t.content, got.map_or("none".to_string(), |g| g.to_string()), sp.id_of(&t.content))));
        }
    }
    let mut tok = tok;
    let add_bos = cfg.bool("add_bos_token", true)?;
    let add_eos = cfg.bool("add_eos_token", false)?;
    let id_of = |name: &Option<String>, key: &str| -> Result<(String, u32), TokenizerError> {
        let s = name
            .clone()
            .ok_or_else(|| corrupt(&cfg.path, key, "is null but the class adds it"))?;
        let id = tok
            .token_to_id(&s)
            .ok_or_else(|| corrupt(&cfg.path, key, "not a token"))?;
        Ok((s, id))
    };
    let (bos, eos) = (
        add_bos.then(|| id_of(&named[0], "bos_token")).transpose()?,
        add_eos.then(|| id_of(&named[1], "eos_token")).transpose()?,
    );
    // InternLM's classes put BOS only before the first sequence of a pair, Baichuan around each.
    let b = bos
        .as_ref()
        .map(|(s, _)| format!("{s} "))
        .unwrap_or_default();
    let e = eos
        .as_ref()
        .map(|(s, _)| format!(" {s}"))
        .unwrap_or_default();
    let pair = if class == "BaichuanTokenizer" {
        format!("{b}$A{e} {b}$B{e}")
    } else {
        format!("{b}$A $B{e}")
    };
    let post = TemplateProcessing::builder()
        .try_single(format!("{b}$A{e}"))
        .and_then(|x| x.try_pair(pair))
        .map_err(|e| tk_err(path, e))?
        .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
        .build()
        .map_err(|e| tk_err(path, e))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}
