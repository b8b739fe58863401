//! A model directory's tokenizer as a [`tokenizers::Tokenizer`], also for the checkpoints that ship
//! no `tokenizer.json` (the remote-code families of issue 13), converted in pure Rust:
//!
//! 1. `tokenizer.json` — loaded as it is.
//! 2. `qwen.tiktoken` (QWen v1, `QWenTokenizer`) — `base64(token) rank` lines become a byte-level
//!    BPE: the merges are every split of a token into two tokens, ranked by the merged token's
//!    rank (tiktoken merges the adjacent pair whose concatenation has the lowest rank), a regex
//!    piece that is itself a token is taken whole (tiktoken's shortcut: `ignore_merges`), the
//!    pre-tokenizer is tokenization_qwen.py's `PAT_STR` (fancy-regex, as tiktoken's own), text is
//!    NFC-normalised first, and the 208 specials (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
//!    `<|extra_0|>`…`<|extra_204|>`) follow the last rank (151643… for the real file) and are
//!    recognised in text (the class encodes with `allowed_special="all"`). No BOS.
//! 3. `tokenizer.model` (sentencepiece BPE) with `tokenizer_config.json`'s `tokenizer_class`:
//!    `ChatGLMTokenizer` (ChatGLM2/3: `[MASK] [gMASK] [sMASK] sop eop`, and for ChatGLM3's file
//!    also `<|system|> <|user|> <|assistant|> <|observation|>`, at ids sp-vocab-size + index,
//!    never recognised in text; prefix `[gMASK] sop`), `BaichuanTokenizer`, `InternLMTokenizer`,
//!    `InternLM2Tokenizer` (BOS/EOS as `add_bos_token`/`add_eos_token` say, the class's defaults
//!    otherwise; `bos/eos/unk/pad_token` and `added_tokens_decoder` recognised in text as the
//!    Python classes do). The post-processor adds these prefix/BOS/EOS ids on
//!    `encode(text, true)` — the class's default `add_special_tokens=True`.
//!
//! Exact (checked against the original Python classes, sentencepiece and tiktoken by
//! `tests/remote_tokenizers.rs`): ids of `tok(text)` and `tok(text, add_special_tokens=False)`,
//! `decode(ids, skip_special_tokens)` of ids without special tokens, and of ids with specials when
//! skipping them (ChatGLM3 excepted: its Python decode keeps `[gMASK]sop` as text even when
//! skipping; here it is dropped). Not exact: the InternLM/Baichuan classes' decode *keeping*
//! special tokens (Python inserts a space before each run of special tokens); sentencepiece
//! decoding an unknown id (`<unk>` here, ` ⁇ ` there); NFC/NFKC tables of a different Unicode
//! version than Python's; BPE ties between two different splits of one merged token that overlap
//! (sentencepiece/tiktoken take the leftmost, here the lower split rank — not seen on the real
//! vocabularies' checks). Refused with a [`TokenizerError`]: sentencepiece models other than BPE
//! (Unigram, word, char), `UNUSED` pieces (sentencepiece re-splits them after merging),
//! `treat_whitespace_as_suffix`, other `tokenizer_class`es, and config settings the conversion
//! would silently ignore. The returned tokenizer must not get more added tokens (the
//! user-defined pieces' match patterns were built for a normaliser that is then extended).

mod families;
mod sentencepiece;
mod tiktoken;

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

pub use families::SUPPORTED_CLASSES;

/// Why a model directory's tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is damaged: truncated, not the format it should be, or inconsistent.
    #[error("{}: {at}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where: `line N`, `byte offset N`, `piece N`, or a field name.
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// The file is valid but asks for something this conversion cannot reproduce exactly.
    #[error("{}: {field}: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The field or class (`tokenizer_class`, `trainer_spec.model_type`, ...).
        field: String,
        /// Why it is refused.
        reason: String,
    },
    /// The `tokenizers` crate refused the converted pieces (or `tokenizer.json` itself).
    #[error("{}: {reason}", path.display())]
    Tokenizers {
        /// The file.
        path: PathBuf,
        /// The crate's message.
        reason: String,
    },
}

/// Which file a [`LoadedTokenizer`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// `tokenizer.json`.
    TokenizerJson,
    /// `qwen.tiktoken` (QWen v1's `QWenTokenizer`).
    Tiktoken,
    /// `tokenizer.model`, with the `tokenizer_class` of `tokenizer_config.json`.
    SentencePiece {
        /// `tokenizer_class`, e.g. `ChatGLMTokenizer`.
        class: String,
    },
}

/// A loaded tokenizer and where it came from.
#[derive(Clone)]
pub struct LoadedTokenizer {
    /// `encode(text, true)` gives the Python class's `tok(text)["input_ids"]` (its BOS/prefix
    /// ids included); `encode(text, false)` gives `add_special_tokens=False`.
    pub tokenizer: Tokenizer,
    /// The file it was made from.
    pub source: TokenizerSource,
    /// That file's path.
    pub path: PathBuf,
}

/// Loads `<dir>`'s tokenizer: `tokenizer.json` if present, else `qwen.tiktoken`, else
/// `tokenizer.model` (+ `tokenizer_config.json`). `Ok(None)` when the directory has none of them.
pub fn load_tokenizer(dir: &Path) -> Result<Option<LoadedTokenizer>, TokenizerError> {
    let json = dir.join("tokenizer.json");
    if json.exists() {
        let tokenizer = Tokenizer::from_file(&json).map_err(|e| TokenizerError::Tokenizers {
            path: json.clone(),
            reason: e.to_string(),
        })?;
        return Ok(Some(LoadedTokenizer {
            tokenizer,
            source: TokenizerSource::TokenizerJson,
            path: json,
        }));
    }
    let tiktoken = dir.join("qwen.tiktoken");
    if tiktoken.exists() {
        let bytes = read(&tiktoken)?;
        let config = families::TokenizerConfig::read(dir)?;
        if let Some(cfg) = &config {
            cfg.expect_class(&["QWenTokenizer"])?;
        }
        let tokenizer = tiktoken::qwen_tokenizer(&tiktoken, &bytes)?;
        return Ok(Some(LoadedTokenizer {
            tokenizer,
            source: TokenizerSource::Tiktoken,
            path: tiktoken,
        }));
    }
    let model = dir.join("tokenizer.model");
    if model.exists() {
        let bytes = read(&model)?;
        let config =
            families::TokenizerConfig::read(dir)?.ok_or_else(|| TokenizerError::Unsupported {
                path: model.clone(),
                field: "tokenizer_class".into(),
                reason: "no tokenizer_config.json next to it, so which tokenizer class (and its \
                         special tokens) applies is unknown"
                    .into(),
            })?;
        // The class first: a tokenizer.model of another kind (glm-4's ChatGLM4Tokenizer keeps
        // a tiktoken file under that name) is refused by its class, not as a bad protobuf.
        config.expect_sentencepiece_class()?;
        let sp = sentencepiece::SpModel::parse(&model, &bytes)?;
        let (tokenizer, class) = families::sentencepiece_tokenizer(&model, &sp, &config)?;
        return Ok(Some(LoadedTokenizer {
            tokenizer,
            source: TokenizerSource::SentencePiece { class },
            path: model,
        }));
    }
    Ok(None)
}

fn read(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.starts_with(b"version https://git-lfs") {
        return Err(TokenizerError::Corrupt {
            path: path.to_path_buf(),
            at: "byte offset 0".into(),
            reason: "a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)".into(),
        });
    }
    Ok(bytes)
}

fn tk_err(path: &Path, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizers {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
