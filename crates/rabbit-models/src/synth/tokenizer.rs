//! The synthetic tokenizer: a real byte-level BPE with Qwen2's pipeline (NFC normalizer, Qwen
//! split regex, ByteLevel pre-tokenizer and decoder) whose merges are learnt here, deterministically,
//! from a small embedded English corpus. Three special tokens follow the BPE vocabulary:
//! `<|endoftext|>`, `<|im_start|>` and `<|im_end|>`.
//!
//! The merges are computed by a plain (slow but tiny) BPE trainer rather than `tokenizers`'
//! `BpeTrainer`, so the result cannot depend on thread scheduling or hash-map order. The
//! `tokenizers` crate is used for what must match the real thing exactly: the pre-tokenization,
//! and loading the produced `tokenizer.json` back as a check.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use serde_json::{json, Value};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
    Tokenizer,
};

/// The embedded training text (original prose written for this purpose).
const CORPUS: &str = include_str!("corpus.txt");

/// Qwen2's pre-tokenizer split pattern.
pub const QWEN_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The ChatML chat template of the Qwen2 tokenizer_config.json (a format, not model data).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// `<|endoftext|>`.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// `<|im_start|>`.
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`.
pub const IM_END: &str = "<|im_end|>";

/// Largest BPE vocabulary (bytes + merges) the trainer aims for.
const TARGET_BPE_VOCAB: usize = 1024;
/// A pair must occur at least this often in the corpus to be merged.
const MIN_PAIR_COUNT: u64 = 2;

/// The learnt tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthTokenizer {
    /// BPE vocabulary, id -> token (byte-level characters).
    pub vocab: Vec<String>,
    /// Merges in priority order.
    pub merges: Vec<(String, String)>,
}

impl SynthTokenizer {
    /// Number of BPE tokens (ids `0..bpe_len()`).
    pub fn bpe_len(&self) -> usize {
        self.vocab.len()
    }

    /// Total size including the special tokens.
    pub fn len(&self) -> usize {
        self.vocab.len() + SPECIALS.len()
    }

    /// Never empty (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Id of `<|endoftext|>`.
    pub fn endoftext_id(&self) -> u32 {
        self.vocab.len() as u32
    }

    /// Id of `<|im_start|>`.
    pub fn im_start_id(&self) -> u32 {
        self.vocab.len() as u32 + 1
    }

    /// Id of `<|im_end|>`.
    pub fn im_end_id(&self) -> u32 {
        self.vocab.len() as u32 + 2
    }

    fn specials(&self) -> impl Iterator<Item = (u32, &'static str)> + '_ {
        SPECIALS
            .iter()
            .enumerate()
            .map(|(i, s)| ((self.vocab.len() + i) as u32, *s))
    }

    /// `tokenizer.json` text, laid out like Qwen2's (vocab in id order).
    pub fn tokenizer_json(&self) -> String {
        let added: Vec<Value> = self
            .specials()
            .map(|(id, content)| {
                json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                })
            })
            .collect();
        let byte_level = json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
        });
        let pre_tokenizer = json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_SPLIT_PATTERN},
                    "behavior": "Isolated",
                    "invert": false
                },
                byte_level
            ]
        });
        let s = |v: &Value| serde_json::to_string(v).expect("JSON value serializes");
        let mut out = String::with_capacity(64 * 1024);
        out.push_str("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n");
        out.push_str("  \"added_tokens\": [\n");
        for (i, a) in added.iter().enumerate() {
            let sep = if i + 1 < added.len() { "," } else { "" };
            let _ = writeln!(out, "    {}{sep}", s(a));
        }
        out.push_str("  ],\n");
        let _ = writeln!(out, "  \"normalizer\": {},", s(&json!({"type": "NFC"})));
        let _ = writeln!(out, "  \"pre_tokenizer\": {},", s(&pre_tokenizer));
        let _ = writeln!(out, "  \"post_processor\": {},", s(&byte_level));
        let _ = writeln!(out, "  \"decoder\": {},", s(&byte_level));
        out.push_str("  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n");
        out.push_str("    \"unk_token\": null,\n    \"continuing_subword_prefix\": \"\",\n");
        out.push_str("    \"end_of_word_suffix\": \"\",\n    \"fuse_unk\": false,\n");
        out.push_str("    \"byte_fallback\": false,\n    \"ignore_merges\": false,\n");
        out.push_str("    \"vocab\": {\n");
        for (id, tok) in self.vocab.iter().enumerate() {
            let sep = if id + 1 < self.vocab.len() { "," } else { "" };
            let _ = writeln!(out, "      {}: {id}{sep}", s(&Value::from(tok.as_str())));
        }
        out.push_str("    },\n    \"merges\": [\n");
        for (i, (a, b)) in self.merges.iter().enumerate() {
            let sep = if i + 1 < self.merges.len() { "," } else { "" };
            let _ = writeln!(out, "      {}{sep}", s(&Value::from(format!("{a} {b}"))));
        }
        out.push_str("    ]\n  }\n}\n");
        out
    }

    /// `tokenizer_config.json` (Qwen2Tokenizer, ChatML template).
    pub fn tokenizer_config_json(&self, model_max_length: usize) -> Value {
        let mut decoder = serde_json::Map::new();
        for (id, content) in self.specials() {
            decoder.insert(
                id.to_string(),
                json!({
                    "content": content, "lstrip": false, "normalized": false, "rstrip": false,
                    "single_word": false, "special": true
                }),
            );
        }
        json!({
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": [IM_START, IM_END],
            "bos_token": null,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": IM_END,
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": ENDOFTEXT,
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null
        })
    }

    /// `vocab.json` (token -> id, for slow tokenizers), in id order.
    pub fn vocab_json(&self) -> String {
        let mut out = String::from("{");
        for (id, tok) in self.vocab.iter().enumerate() {
            if id > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{id}", Value::from(tok.as_str()));
        }
        out.push_str("}\n");
        out
    }

    /// `merges.txt` (GPT-2 format with the version header).
    pub fn merges_txt(&self) -> String {
        let mut out = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            let _ = writeln!(out, "{a} {b}");
        }
        out
    }

    /// Loads the produced `tokenizer.json` with the `tokenizers` crate.
    pub fn load(&self) -> Result<Tokenizer, String> {
        Tokenizer::from_bytes(self.tokenizer_json().as_bytes()).map_err(|e| e.to_string())
    }
}

const SPECIALS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// GPT-2's byte -> printable character table, in GPT-2 vocabulary order: the printable bytes
/// first (in byte order), then the others mapped to U+0100 onwards.
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !printable(b) {
            out.push((b, char::from_u32(256 + n).expect("valid code point")));
            n += 1;
        }
    }
    out
}

fn pre_tokenizer() -> Result<Sequence, String> {
    let split = Split::new(
        SplitPattern::Regex(QWEN_SPLIT_PATTERN.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| e.to_string())?;
    Ok(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ]))
}

/// Trains the BPE on the embedded corpus (uncached; [`synthetic_tokenizer`] caches it). A pure
/// function of the corpus: words are sorted and ties between equally frequent pairs are broken
/// by token id, so the result is the same on every run and platform.
pub fn train() -> Result<SynthTokenizer, String> {
    let mut vocab: Vec<String> = byte_level_alphabet()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut ids: HashMap<String, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();

    // Pre-tokenize exactly as the final tokenizer will (the corpus is ASCII, so NFC is a no-op).
    let mut pts = PreTokenizedString::from(CORPUS);
    pre_tokenizer()?
        .pre_tokenize(&mut pts)
        .map_err(|e| e.to_string())?;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(piece.to_string()).or_default() += 1;
    }
    let mut words: Vec<(String, u64)> = counts.into_iter().collect();
    words.sort();
    let mut words: Vec<(Vec<u32>, u64)> = words
        .into_iter()
        .map(|(w, c)| {
            let syms = w
                .chars()
                .map(|ch| {
                    ids.get(ch.encode_utf8(&mut [0; 4]) as &str)
                        .copied()
                        .ok_or_else(|| format!("character {ch:?} is not in the byte alphabet"))
                })
                .collect::<Result<Vec<u32>, String>>()?;
            Ok((syms, c))
        })
        .collect::<Result<_, String>>()?;

    let mut merges = Vec::new();
    while vocab.len() < TARGET_BPE_VOCAB {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (syms, c) in &words {
            for w in syms.windows(2) {
                *pairs.entry((w[0], w[1])).or_default() += c;
            }
        }
        let best = pairs
            .into_iter()
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then_with(|| pb.cmp(pa)));
        let Some(((a, b), count)) = best else { break };
        if count < MIN_PAIR_COUNT {
            break;
        }
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let new_id = match ids.get(&merged) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                vocab.push(merged.clone());
                ids.insert(merged, id);
                id
            }
        };
        merges.push((vocab[a as usize].clone(), vocab[b as usize].clone()));
        for (syms, _) in &mut words {
            if syms.len() < 2 {
                continue;
            }
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    out.push(new_id);
                    i += 2;
                } else {
                    out.push(syms[i]);
                    i += 1;
                }
            }
            *syms = out;
        }
    }
    Ok(SynthTokenizer { vocab, merges })
}

/// The synthetic tokenizer (trained once per process; the result is deterministic).
pub fn synthetic_tokenizer() -> Result<&'static SynthTokenizer, String> {
    static CELL: OnceLock<Result<SynthTokenizer, String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let t = train()?;
        // The produced file must load and round-trip with the real library.
        let tok = t.load()?;
        let enc = tok.encode(CORPUS, false).map_err(|e| e.to_string())?;
        let back = tok
            .decode(enc.get_ids(), false)
            .map_err(|e| e.to_string())?;
        if back != CORPUS {
            return Err("the synthetic tokenizer does not round-trip its own corpus".into());
        }
        if tok.get_vocab_size(true) != t.len() {
            return Err(format!(
                "the synthetic tokenizer has {} tokens once loaded, expected {}",
                tok.get_vocab_size(true),
                t.len()
            ));
        }
        Ok(t)
    })
    .as_ref()
    .map_err(Clone::clone)
}
