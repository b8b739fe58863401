//! A sentencepiece `tokenizer.model` (protobuf `ModelProto`): a small reader for the fields that
//! decide encoding, and its BPE as a [`Tokenizer`] core (model, normaliser, decoder, user-defined
//! pieces). The family's special tokens and BOS/prefix are `families.rs`' part.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::{tk_err, TokenizerError};

const SPACE: &str = "\u{2581}";

/// transformers' `clean_up_tokenization` replacements.
const CLEANUP: &[(&str, &str)] = &[
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
];

/// sentencepiece's piece types (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// One vocabulary entry.
#[derive(Debug, Clone)]
pub(crate) struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// What of a `ModelProto` decides encoding and decoding.
#[derive(Debug, Clone)]
pub(crate) struct SpModel {
    pub path: PathBuf,
    pub pieces: Vec<Piece>,
    pub model_type: u64,
    pub byte_fallback: bool,
    pub treat_whitespace_as_suffix: bool,
    pub unk_id: i64,
    pub bos_id: i64,
    pub eos_id: i64,
    pub normalizer_name: String,
    pub charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8], usize),
    Fixed32(u32),
    Fixed64,
}

/// Protobuf wire-format reader over one message; `base` is the message's offset in the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, (usize, String)> {
        let start = self.base + self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err((start, "truncated varint".into()));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err((start, "varint longer than 10 bytes".into()))
    }

    fn take(&mut self, n: usize) -> Result<(&'a [u8], usize), (usize, String)> {
        let at = self.base + self.pos;
        if self.buf.len() - self.pos < n {
            return Err((
                at,
                format!("field of {n} bytes runs past the end (truncated file?)"),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok((s, at))
    }

    fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, (usize, String)> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.base + self.pos;
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| (at, "length overflows".to_string()))?;
                let (s, off) = self.take(n)?;
                Value::Bytes(s, off)
            }
            5 => {
                let (s, _) = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            }
            w => {
                return Err((
                    at,
                    format!("invalid wire type {w} (not a sentencepiece model?)"),
                ))
            }
        };
        if field == 0 {
            return Err((at, "field number 0 (not a sentencepiece model?)".into()));
        }
        Ok(Some((field, value)))
    }
}

fn sub(bytes: &[u8], off: usize) -> Reader<'_> {
    Reader {
        buf: bytes,
        pos: 0,
        base: off,
    }
}

impl SpModel {
    /// Reads the model; a damaged file is an error naming the byte offset.
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<SpModel, TokenizerError> {
        let corrupt = |(off, reason): (usize, String)| TokenizerError::Corrupt {
            path: path.to_path_buf(),
            at: format!("byte offset {off}"),
            reason,
        };
        let mut m = SpModel {
            path: path.to_path_buf(),
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            normalizer_name: String::new(),
            charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let text = |s: &[u8], off: usize| {
            String::from_utf8(s.to_vec())
                .map_err(|_| (off, "string field is not UTF-8".to_string()))
        };
        let mut r = sub(bytes, 0);
        while let Some((field, v)) = r.next().map_err(corrupt)? {
            let Value::Bytes(msg, off) = v else {
                if field <= 5 {
                    return Err(corrupt((
                        r.base + r.pos,
                        format!("field {field} is not a message"),
                    )));
                }
                continue;
            };
            let mut s = sub(msg, off);
            match field {
                1 => {
                    let mut p = Piece {
                        piece: String::new(),
                        score: 0.0,
                        kind: PieceType::Normal,
                    };
                    while let Some((f, v)) = s.next().map_err(corrupt)? {
                        match (f, v) {
                            (1, Value::Bytes(b, o)) => p.piece = text(b, o).map_err(corrupt)?,
                            (2, Value::Fixed32(x)) => p.score = f32::from_bits(x),
                            (3, Value::Varint(t)) => {
                                p.kind = match t {
                                    1 => PieceType::Normal,
                                    2 => PieceType::Unknown,
                                    3 => PieceType::Control,
                                    4 => PieceType::UserDefined,
                                    5 => PieceType::Unused,
                                    6 => PieceType::Byte,
                                    t => {
                                        return Err(corrupt((
                                            off,
                                            format!("piece type {t} unknown"),
                                        )))
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    m.pieces.push(p);
                }
                2 => {
                    while let Some((f, v)) = s.next().map_err(corrupt)? {
                        match (f, v) {
                            (3, Value::Varint(x)) => m.model_type = x,
                            (24, Value::Varint(x)) => m.treat_whitespace_as_suffix = x != 0,
                            (35, Value::Varint(x)) => m.byte_fallback = x != 0,
                            (40, Value::Varint(x)) => m.unk_id = x as i32 as i64,
                            (41, Value::Varint(x)) => m.bos_id = x as i32 as i64,
                            (42, Value::Varint(x)) => m.eos_id = x as i32 as i64,
                            _ => {}
                        }
                    }
                }
                3 => {
                    while let Some((f, v)) = s.next().map_err(corrupt)? {
                        match (f, v) {
                            (1, Value::Bytes(b, o)) => {
                                m.normalizer_name = text(b, o).map_err(corrupt)?
                            }
                            (2, Value::Bytes(b, _)) => m.charsmap = b.to_vec(),
                            (3, Value::Varint(x)) => m.add_dummy_prefix = x != 0,
                            (4, Value::Varint(x)) => m.remove_extra_whitespaces = x != 0,
                            (5, Value::Varint(x)) => m.escape_whitespaces = x != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), TokenizerError> {
        let unsupported = |field: &str, reason: String| TokenizerError::Unsupported {
            path: self.path.clone(),
            field: field.into(),
            reason,
        };
        let corrupt = |at: String, reason: String| TokenizerError::Corrupt {
            path: self.path.clone(),
            at,
            reason,
        };
        if self.pieces.is_empty() {
            return Err(corrupt(
                "pieces".into(),
                "no pieces (empty or truncated file?)".into(),
            ));
        }
        match self.model_type {
            2 => {}
            1 => return Err(unsupported("trainer_spec.model_type", "UNIGRAM: only sentencepiece BPE models are converted (the families of issue 13 use BPE)".into())),
            t => return Err(unsupported("trainer_spec.model_type", format!("{} is not converted (only BPE)", match t { 3 => "WORD".to_string(), 4 => "CHAR".to_string(), t => format!("type {t}") }))),
        }
        if self.treat_whitespace_as_suffix {
            return Err(unsupported(
                "trainer_spec.treat_whitespace_as_suffix",
                "true is not converted".into(),
            ));
        }
        let mut seen = HashMap::new();
        for (i, p) in self.pieces.iter().enumerate() {
            if p.piece.is_empty() {
                return Err(corrupt(format!("piece {i}"), "empty piece".into()));
            }
            if let Some(j) = seen.insert(p.piece.as_str(), i) {
                return Err(corrupt(
                    format!("piece {i}"),
                    format!("{:?} repeats piece {j}", p.piece),
                ));
            }
            if p.kind == PieceType::Unused {
                return Err(unsupported(&format!("piece {i} ({:?})", p.piece), "UNUSED pieces are re-split by sentencepiece after merging, which a BPE tokenizer cannot do".into()));
            }
        }
        let unk = usize::try_from(self.unk_id)
            .ok()
            .filter(|&u| u < self.pieces.len());
        if unk.map(|u| self.pieces[u].kind) != Some(PieceType::Unknown) {
            return Err(corrupt(
                "trainer_spec.unk_id".into(),
                format!("{} is not an UNKNOWN piece", self.unk_id),
            ));
        }
        if self.byte_fallback {
            for b in 0..=255u8 {
                let name = format!("<0x{b:02X}>");
                if seen.get(name.as_str()).map(|&i| self.pieces[i].kind) != Some(PieceType::Byte) {
                    return Err(corrupt(
                        "pieces".into(),
                        format!("byte_fallback is on but the BYTE piece {name} is missing"),
                    ));
                }
            }
        }
        if !self.charsmap.is_empty() {
            Precompiled::from(&self.charsmap).map_err(|e| {
                corrupt("normalizer_spec.precompiled_charsmap".into(), e.to_string())
            })?;
        }
        Ok(())
    }

    /// The id of a piece string.
    pub(crate) fn id_of(&self, piece: &str) -> Option<u32> {
        self.pieces
            .iter()
            .position(|p| p.piece == piece)
            .map(|i| i as u32)
    }

    /// A piece id in range (`bos_id`/`eos_id` are -1 when the model has none).
    pub(crate) fn special_id(&self, id: i64) -> Option<u32> {
        usize::try_from(id)
            .ok()
            .filter(|&i| i < self.pieces.len())
            .map(|i| i as u32)
    }

    /// The tokenizer: BPE over the pieces, sentencepiece's normaliser, its decoder. `extra` are
    /// the family's tokens recognised before the model (normalised = false); the user-defined
    /// pieces (matched whole by sentencepiece inside the normalised text) are added as
    /// normalised tokens. Both are added before the dummy prefix joins the normaliser, so a
    /// user-defined piece's match pattern does not get it. `cleanup`: end decoding with
    /// transformers' `clean_up_tokenization` (which the InternLM classes always call).
    pub(crate) fn tokenizer(
        &self,
        extra: &[AddedToken],
        cleanup: bool,
    ) -> Result<Tokenizer, TokenizerError> {
        let path = &self.path;
        let vocab: tokenizers::models::bpe::Vocab = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (self.vocab_string(i, p), i as u32))
            .collect();
        // sentencepiece merges two adjacent symbols when their concatenation is a piece, the
        // highest score first: every split of a normal piece into two normal pieces is a merge,
        // in score order (ties: lower id, then the split's position).
        let normal: HashMap<&str, usize> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PieceType::Normal)
            .map(|(i, p)| (p.piece.as_str(), i))
            .collect();
        let mut order: Vec<usize> = normal.values().copied().collect();
        order.sort_by(|&a, &b| {
            self.pieces[b]
                .score
                .total_cmp(&self.pieces[a].score)
                .then(a.cmp(&b))
        });
        let mut merges = Vec::new();
        for i in order {
            let s = self.pieces[i].piece.as_str();
            for (k, _) in s.char_indices().skip(1) {
                if normal.contains_key(&s[..k]) && normal.contains_key(&s[k..]) {
                    merges.push((s[..k].to_string(), s[k..].to_string()));
                }
            }
        }
        let unk = self.pieces[self.unk_id as usize].piece.clone();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(self.byte_fallback)
            .build()
            .map_err(|e| tk_err(path, e))?;
        let mut tok = Tokenizer::new(bpe);
        let escape = |n: &mut Vec<NormalizerWrapper>| -> Result<(), TokenizerError> {
            if self.escape_whitespaces {
                n.push(
                    Replace::new(" ", SPACE)
                        .map_err(|e| tk_err(path, e))?
                        .into(),
                );
            }
            Ok(())
        };
        let mut matching = Vec::new();
        escape(&mut matching)?;
        tok.with_normalizer(Some(Sequence::new(matching)));
        tok.add_tokens(&self.user_defined(extra));
        tok.add_special_tokens(
            &extra
                .iter()
                .filter(|t| t.special)
                .cloned()
                .collect::<Vec<_>>(),
        );
        tok.add_tokens(
            &extra
                .iter()
                .filter(|t| !t.special)
                .cloned()
                .collect::<Vec<_>>(),
        );
        tok.with_normalizer(Some(self.normalizer()?));
        let mut dec: Vec<DecoderWrapper> = vec![
            Replace::new(SPACE, " ")
                .map_err(|e| tk_err(path, e))?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        // sentencepiece drops the first piece's leading space when it adds one (or removes
        // extra whitespace) on encoding.
        if self.add_dummy_prefix || self.remove_extra_whitespaces {
            dec.push(Strip::new(' ', 1, 0).into());
        }
        if cleanup {
            // tokenization_utils_base.py `clean_up_tokenization`, same replacements, same order
            // (after Fuse the decoders see the whole text as one token).
            for (from, to) in CLEANUP {
                dec.push(
                    Replace::new(*from, *to)
                        .map_err(|e| tk_err(path, e))?
                        .into(),
                );
            }
        }
        tok.with_decoder(Some(DecoderSequence::new(dec)));
        Ok(tok)
    }

    /// A piece's string in the BPE vocabulary. sentencepiece treats a `\0` piece as UNUSED when
    /// byte_fallback is on (NUL then encodes as `<0x00>`; the real InternLM model has one), so
    /// that piece gets a string no text produces.
    fn vocab_string(&self, i: usize, p: &Piece) -> String {
        if self.byte_fallback && p.piece == "\0" {
            format!("<unused NUL piece {i}>")
        } else {
            p.piece.clone()
        }
    }

    fn user_defined(&self, extra: &[AddedToken]) -> Vec<AddedToken> {
        self.pieces
            .iter()
            .filter(|p| p.kind == PieceType::UserDefined)
            .filter(|p| !extra.iter().any(|t| t.content == p.piece))
            .map(|p| AddedToken::from(p.piece.clone(), false).normalized(true))
            .collect()
    }

    /// sentencepiece's normaliser: charsmap, whitespace clean-up, dummy prefix, `▁` for spaces.
    fn normalizer(&self) -> Result<Sequence, TokenizerError> {
        let path = &self.path;
        let mut n: Vec<NormalizerWrapper> = Vec::new();
        if !self.charsmap.is_empty() {
            n.push(
                Precompiled::from(&self.charsmap)
                    .map_err(|e| tk_err(path, e))?
                    .into(),
            );
        }
        if self.remove_extra_whitespaces {
            for (pat, rep) in [("^ +", ""), (" +$", ""), (" {2,}", " ")] {
                let re = tokenizers::normalizers::replace::ReplacePattern::Regex(pat.into());
                n.push(Replace::new(re, rep).map_err(|e| tk_err(path, e))?.into());
            }
        }
        if self.add_dummy_prefix {
            n.push(Prepend::new(SPACE.into()).into());
        }
        if self.escape_whitespaces {
            n.push(
                Replace::new(" ", SPACE)
                    .map_err(|e| tk_err(path, e))?
                    .into(),
            );
        }
        Ok(Sequence::new(n))
    }
}
