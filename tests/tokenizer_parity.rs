//! The real Qwen2 and Qwen3 tokenizer files (in the shared data directory beside the checkout)
//! encode and decode exactly as the Python `tokenizers` library does, per their
//! `encode_checks.json`.

use std::path::PathBuf;

use rabbitllm::core::text;
use serde_json::Value;
use tokenizers::{NormalizedString, Normalizer};

fn tokenizer_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/tokenizers")
        .join(name)
}

fn check(name: &str) {
    let dir = tokenizer_dir(name);
    assert!(
        dir.join("tokenizer.json").exists(),
        "missing {}: the shared data directory must sit beside the checkout",
        dir.display()
    );
    let tok = text::load_tokenizer(&dir)
        .unwrap()
        .expect("tokenizer.json present");
    let checks: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("encode_checks.json")).unwrap())
            .unwrap();
    assert_eq!(checks["add_special_tokens"], Value::Bool(false));
    let cases = checks["cases"].as_array().unwrap();
    assert!(cases.len() > 10);
    for c in cases {
        let text_in = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = text::encode(&tok, text_in).unwrap();
        assert_eq!(got, want, "{name}: encoding {text_in:?}");
        // Decoding (keeping special tokens) gives back the text after the tokenizer's NFC
        // normalisation: byte-level BPE itself is lossless.
        let mut normalized = NormalizedString::from(text_in);
        tok.get_normalizer()
            .expect("Qwen tokenizers normalise (NFC)")
            .normalize(&mut normalized)
            .unwrap();
        let back = tok.decode(&got, false).unwrap();
        assert_eq!(back, normalized.get(), "{name}: decoding {want:?}");
    }
}

#[test]
fn qwen2_tokenizer_matches_python() {
    check("qwen2");
}

#[test]
fn qwen3_tokenizer_matches_python() {
    check("qwen3");
}
