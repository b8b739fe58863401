//! QWen v1's `qwen.tiktoken` → a byte-level BPE [`Tokenizer`] (see the module docs of `tokenizer`).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{tk_err, TokenizerError};

/// tokenization_qwen.py `PAT_STR`.
pub(crate) const QWEN_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// tokenization_qwen.py's specials, in id order after the last rank.
pub(crate) fn qwen_specials() -> Vec<String> {
    let mut v = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    ];
    v.extend((0..205).map(|i| format!("<|extra_{i}|>")));
    v
}

/// Parses `base64(token) rank` lines (empty lines skipped, as `_load_tiktoken_bpe` does) into the
/// tokens by rank. Ranks must be exactly 0..N (the original asserts N + 208 == n_vocab, which
/// only holds for a gap-free table) and every single byte must be a token.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TokenizerError> {
    let corrupt = |line: usize, reason: String| TokenizerError::Corrupt {
        path: path.to_path_buf(),
        at: format!("line {line}"),
        reason,
    };
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let parts: Vec<&[u8]> = raw
            .split(|b| b.is_ascii_whitespace())
            .filter(|p| !p.is_empty())
            .collect();
        let [tok, rank] = parts[..] else {
            return Err(corrupt(
                line,
                format!("expected `base64 rank`, found {} fields", parts.len()),
            ));
        };
        let token = decode_base64(tok)
            .ok_or_else(|| corrupt(line, "the token is not valid base64".into()))?;
        let rank: usize = std::str::from_utf8(rank)
            .ok()
            .and_then(|r| r.parse().ok())
            .filter(|&r: &usize| r < u32::MAX as usize / 2)
            .ok_or_else(|| corrupt(line, "the rank is not a non-negative integer".into()))?;
        if token.is_empty() {
            return Err(corrupt(line, "empty token".into()));
        }
        if let Some(prev) = seen.insert(token.clone(), line) {
            return Err(corrupt(
                line,
                format!("token repeated (first on line {prev})"),
            ));
        }
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].is_some() {
            return Err(corrupt(line, format!("rank {rank} repeated")));
        }
        by_rank[rank] = Some(token);
    }
    let n = by_rank.len();
    let tokens: Vec<Vec<u8>> = by_rank
        .into_iter()
        .enumerate()
        .map(|(r, t)| {
            t.ok_or_else(|| TokenizerError::Corrupt {
                path: path.to_path_buf(),
                at: format!("rank {r}"),
                reason: format!("missing: the ranks must be exactly 0..{n} (truncated file?)"),
            })
        })
        .collect::<Result<_, _>>()?;
    if let Some(b) = (0..=255u8).find(|b| !seen.contains_key(&vec![*b])) {
        return Err(TokenizerError::Corrupt {
            path: path.to_path_buf(),
            at: format!("{n} ranks"),
            reason: format!(
                "no token for the single byte 0x{b:02X}: text with it cannot be encoded"
            ),
        });
    }
    Ok(tokens)
}

/// Builds QWen v1's tokenizer from the file's bytes.
pub(crate) fn qwen_tokenizer(path: &Path, bytes: &[u8]) -> Result<Tokenizer, TokenizerError> {
    let tokens = parse(path, bytes)?;
    let chars = bytes_to_chars();
    let map = |t: &[u8]| -> String { t.iter().map(|&b| chars[b as usize]).collect() };
    let rank_of: HashMap<&[u8], usize> = tokens
        .iter()
        .enumerate()
        .map(|(r, t)| (t.as_slice(), r))
        .collect();
    // Every split of a token into two tokens is a merge (tiktoken merges any adjacent pair whose
    // concatenation is a token), ranked by the merged token's rank.
    let mut merges = Vec::new();
    for t in &tokens {
        for k in 1..t.len() {
            if rank_of.contains_key(&t[..k]) && rank_of.contains_key(&t[k..]) {
                merges.push((map(&t[..k]), map(&t[k..])));
            }
        }
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(r, t)| (map(t), r as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .build()
        .map_err(|e| tk_err(path, e))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(QWEN_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tk_err(path, e))?;
    let byte_level = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, false);
    tok.with_normalizer(Some(NFC));
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    let n = tokens.len() as u32;
    let specials: Vec<AddedToken> = qwen_specials()
        .into_iter()
        .map(|s| AddedToken::from(s, true))
        .collect();
    tok.add_special_tokens(&specials);
    for (i, s) in qwen_specials().iter().enumerate() {
        if tok.token_to_id(s) != Some(n + i as u32) {
            return Err(TokenizerError::Corrupt {
                path: path.to_path_buf(),
                at: format!("special {s}"),
                reason: format!(
                    "expected at id {}, the rank table already has it",
                    n + i as u32
                ),
            });
        }
    }
    Ok(tok)
}

/// GPT-2's byte → printable char map (what `tokenizers`' ByteLevel uses).
fn bytes_to_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                c
            }
        })
        .collect()
}

/// Standard base64 with `=` padding (the file's encoding); `None` if malformed.
fn decode_base64(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let body = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(s);
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in body.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | val(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&acc.to_be_bytes()[1..]),
            3 => out.extend_from_slice(&(acc << 6).to_be_bytes()[1..3]),
            2 => out.push((acc >> 4) as u8),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::decode_base64;

    #[test]
    fn base64_decodes_padded_and_refuses_garbage() {
        assert_eq!(decode_base64(b"IQ==").unwrap(), b"!");
        assert_eq!(decode_base64(b"aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64(b"aGVs").unwrap(), b"hel");
        assert!(decode_base64(b"aG!s").is_none());
        assert!(decode_base64(b"aGV").is_none());
    }
}
