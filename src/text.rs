//! Text ↔ token ids through the model's tokenizer (the `tokenizers` crate, pure-Rust fancy-regex
//! backend): its `tokenizer.json`, or for checkpoints that ship none (QWen v1, ChatGLM,
//! Baichuan, InternLM) their `qwen.tiktoken` / `tokenizer.model`, converted on load.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Loads the tokenizer of the model in `dir`, if it has one (see
/// [`rabbit_models::tokenizer::load_tokenizer`] for the files and their order).
pub fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    rabbit_models::tokenizer::load_tokenizer(dir)
        .map(|t| t.map(|t| t.tokenizer))
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// A tokenizer in two modes: special-token strings in the text (`<|im_end|>`) either become
/// control tokens (for a rendered chat template, whose markup must) or stay plain text (for what
/// a user typed, which must not be able to end a turn or fake a role).
#[derive(Clone)]
pub struct TextCodec {
    special: Tokenizer,
    plain: Tokenizer,
    max_token_bytes: usize,
}

impl TextCodec {
    /// Wraps a loaded tokenizer.
    pub fn new(tok: Tokenizer) -> TextCodec {
        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);
        let mut special = tok;
        special.set_encode_special_tokens(false);
        // A vocabulary entry is written with at least as many UTF-8 bytes as the text it covers
        // (byte-level BPE maps each byte to one 1–2-byte char; SentencePiece's `▁` is 3 bytes for
        // one space; byte-fallback `<0xNN>` is 6 for one), so this bounds bytes per token.
        let max_token_bytes = special
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        TextCodec {
            special,
            plain,
            max_token_bytes,
        }
    }

    /// The most bytes of text one token can stand for (an upper bound from the vocabulary).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Text longer than this cannot encode to `context` tokens or fewer, whatever it says: such
    /// text is refused before the tokenizer spends time and memory on it. The factor 4 leaves
    /// room for normalizers that shorten text.
    pub fn max_text_bytes(&self, context: usize) -> usize {
        context
            .saturating_mul(self.max_token_bytes)
            .saturating_mul(4)
    }

    /// The tokenizer (special-token parsing on).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.special
    }

    /// Text → ids without BOS/EOS. `parse_special`: whether special-token strings in the text
    /// become control tokens.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.special
        } else {
            &self.plain
        };
        let enc = tok
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A user's prompt → ids as the model's own tokenizer class gives them by default
    /// (`tokenizer(text)` in transformers): with the BOS or prefix ids its post-processor adds
    /// (Llama's BOS, ChatGLM's `[gMASK] sop`), special-token strings in the text kept as text.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids → text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Incremental decoder for streaming: yields text only once it forms whole characters, so a
    /// multi-byte character split across tokens is never printed half.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            inner: self.special.decode_stream(true),
        }
    }
}

impl TextCodec {
    /// One token as OpenAI's log-probabilities show it: its text (special tokens by name), and
    /// the bytes it stands for. A byte-level BPE token (GPT-2, Qwen, Llama 3) maps back to its
    /// exact bytes, a byte-fallback `<0xNN>` to its byte, a SentencePiece piece with `▁` as a
    /// space; otherwise the bytes are its text's.
    pub fn token_text_and_bytes(&self, id: u32) -> (String, Vec<u8>) {
        let text = self.special.decode(&[id], false).unwrap_or_default();
        let Some(piece) = self.special.id_to_token(id) else {
            return (text.clone(), text.into_bytes());
        };
        let is_special = self
            .special
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special);
        if is_special {
            return (piece.clone(), piece.into_bytes());
        }
        let byte_level = matches!(
            self.special.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        if byte_level {
            if let Some(bytes) = piece.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                return (String::from_utf8_lossy(&bytes).into_owned(), bytes);
            }
        }
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return (String::from_utf8_lossy(&[b]).into_owned(), vec![b]);
            }
        }
        if piece.contains('\u{2581}') {
            let t = piece.replace('\u{2581}', " ");
            return (t.clone(), t.into_bytes());
        }
        (text.clone(), text.into_bytes())
    }
}

/// GPT-2's byte-level alphabet backwards: the byte a char of a byte-level BPE token stands for.
fn byte_of_char(c: char) -> Option<u8> {
    let c = c as u32;
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    // The other bytes, in order, were given the chars from U+0100 on.
    let n = c.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// Start/end of a placeholder standing for a special-token string that a message's content
/// contains (private-use code points no tokenizer or template produces).
const SENTINEL_OPEN: char = '\u{10FFFD}';
const SENTINEL_CLOSE: char = '\u{10FFFE}';

impl TextCodec {
    /// The special tokens' strings (`<|im_end|>`, ...), longest first.
    fn special_strings(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .special
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        v.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        v.dedup();
        v
    }

    /// Replaces special-token strings in user-provided text by placeholders, so that a template
    /// rendering it keeps them apart from its own markup. Undo with [`TextCodec::encode_rendered`].
    pub fn protect(&self, content: &str) -> String {
        let specials = self.special_strings();
        let mut out = String::with_capacity(content.len());
        let mut rest = content;
        'outer: while !rest.is_empty() {
            for (k, sp) in specials.iter().enumerate() {
                if rest.starts_with(sp.as_str()) {
                    out.push(SENTINEL_OPEN);
                    out.push_str(&k.to_string());
                    out.push(SENTINEL_CLOSE);
                    rest = &rest[sp.len()..];
                    continue 'outer;
                }
            }
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// Encodes a rendered chat template whose message contents went through
    /// [`TextCodec::protect`]: the template's markup becomes control tokens, while a special-token
    /// string a user typed stays plain text. Without placeholders this is exactly
    /// `encode(text, true)`, i.e. what transformers' `apply_chat_template(tokenize=True)` gives.
    pub fn encode_rendered(&self, rendered: &str) -> Result<Vec<u32>> {
        let specials = self.special_strings();
        let mut ids = Vec::new();
        let mut rest = rendered;
        while let Some(open) = rest.find(SENTINEL_OPEN) {
            let after = &rest[open + SENTINEL_OPEN.len_utf8()..];
            let Some(close) = after.find(SENTINEL_CLOSE) else {
                break;
            };
            let Some(sp) = after[..close]
                .parse::<usize>()
                .ok()
                .and_then(|k| specials.get(k))
            else {
                break;
            };
            ids.extend(self.encode(&rest[..open], true)?);
            ids.extend(self.encode(sp, false)?);
            rest = &after[close + SENTINEL_CLOSE.len_utf8()..];
        }
        ids.extend(self.encode(rest, true)?);
        Ok(ids)
    }
}

/// See [`TextCodec::stream`].
pub struct TextStream<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TextStream<'_> {
    /// Feeds one token; returns the new text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner
            .step(id)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Streamed text minus what could still become a stop string: what a reader is shown is exactly
/// the final text cut before the first stop string, however the pieces arrive.
#[derive(Debug, Clone)]
pub struct StopHold {
    stops: Vec<String>,
    text: String,
    printed: usize,
    hold: usize,
    stopped: bool,
}

impl StopHold {
    /// Watches for `stops` (empty strings are ignored: they would stop before any text).
    pub fn new(mut stops: Vec<String>) -> StopHold {
        stops.retain(|s| !s.is_empty());
        StopHold {
            // A stop string not yet complete is at most this long.
            hold: stops
                .iter()
                .map(String::len)
                .max()
                .unwrap_or(1)
                .saturating_sub(1),
            stops,
            text: String::new(),
            printed: 0,
            stopped: false,
        }
    }

    /// Adds a streamed piece; returns what can be shown now.
    pub fn push(&mut self, piece: &str) -> &str {
        if self.stopped {
            return "";
        }
        self.text.push_str(piece);
        // A match cannot start in text already shown: it would have been found, or held back.
        let from = self.printed;
        let mut end = match self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| i + from))
            .min()
        {
            Some(cut) => {
                self.stopped = true;
                cut
            }
            None => self.text.len().saturating_sub(self.hold),
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let end = end.max(self.printed);
        let start = std::mem::replace(&mut self.printed, end);
        &self.text[start..end]
    }

    /// Whether a stop string has matched (the text ends before it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// What is left to show once the generation has ended.
    pub fn finish(&mut self) -> &str {
        if self.stopped {
            return "";
        }
        let start = std::mem::replace(&mut self.printed, self.text.len());
        &self.text[start..]
    }

    /// The whole text so far, cut before the stop string once one matched.
    pub fn text(&self) -> &str {
        if self.stopped {
            &self.text[..self.printed]
        } else {
            &self.text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StopHold;

    fn stream(pieces: &[&str], stops: &[&str]) -> String {
        let mut h = StopHold::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out.push_str(h.push(p));
        }
        out.push_str(h.finish());
        assert_eq!(out, h.text());
        out
    }

    #[test]
    fn byte_level_chars_map_back_to_their_bytes() {
        // 'Ġ' (U+0120) is the space, 'Ċ' (U+010A) the newline, printable ASCII itself.
        assert_eq!(super::byte_of_char('\u{120}'), Some(b' '));
        assert_eq!(super::byte_of_char('\u{10A}'), Some(b'\n'));
        assert_eq!(super::byte_of_char('a'), Some(b'a'));
        assert_eq!(super::byte_of_char('\u{100}'), Some(0));
        assert_eq!(super::byte_of_char('\u{2581}'), None);
        let all: std::collections::HashSet<u8> = (0u32..0x200)
            .filter_map(|c| char::from_u32(c).and_then(super::byte_of_char))
            .collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn streamed_text_stops_exactly_before_the_stop_string() {
        assert_eq!(stream(&["Hello", " wor", "ld"], &[]), "Hello world");
        assert_eq!(stream(&["a\n", "\nb", "c"], &["\n\n"]), "a");
        assert_eq!(stream(&["x<|e", "nd|>y", "z"], &["<|end|>"]), "x");
        // A prefix of a stop string that does not complete is shown in the end.
        assert_eq!(stream(&["x<|e", "x"], &["<|end|>"]), "x<|ex");
        // Never cut inside a character.
        assert_eq!(stream(&["日本", "語STOP"], &["STOP"]), "日本語");
        assert_eq!(stream(&["日本語"], &["語S"]), "日本語");
        // The earliest of several stops; one spanning many pieces.
        assert_eq!(stream(&["ab", "c", "d", "e"], &["cde", "d"]), "abc");
        assert_eq!(stream(&["a", "b", "c", "d"], &["bcd"]), "a");
        assert_eq!(stream(&["abc"], &[""]), "abc");
    }
}
