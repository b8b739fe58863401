//! The remote-code families' tokenizers (issue 13), converted in pure Rust from `qwen.tiktoken` /
//! sentencepiece `tokenizer.model`, against the ORIGINAL Python classes: the goldens under
//! `tests/fixtures/tokenizers/<family>/golden.json` are written by `make_tokenizer_fixtures.py`
//! there (tiny trained sentencepiece models, the first ranks of the real qwen.tiktoken), plus
//! damaged and unsupported inputs. `real_vocabularies` (ignored) checks the real files.

use std::fs;
use std::path::{Path, PathBuf};

use rabbit_models::tokenizer::{load_tokenizer, LoadedTokenizer, TokenizerError, TokenizerSource};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizers");

fn fixture(fam: &str) -> PathBuf {
    Path::new(FIXTURES).join(fam)
}

fn load(dir: &Path) -> LoadedTokenizer {
    load_tokenizer(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .unwrap_or_else(|| panic!("{}: no tokenizer found", dir.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Compares every golden case; returns the number of cases checked.
fn check_goldens(dir: &Path, golden: &Path) -> usize {
    let tok = load(dir);
    let g: Value = serde_json::from_str(&fs::read_to_string(golden).expect("golden.json")).unwrap();
    let class = g["tokenizer_class"].as_str().unwrap();
    match &tok.source {
        TokenizerSource::Tiktoken => assert_eq!(class, "QWenTokenizer"),
        TokenizerSource::SentencePiece { class: c } => assert_eq!(c, class),
        s => panic!("{}: unexpected source {s:?}", dir.display()),
    }
    // ChatGLM3's Python decode keeps its own specials ([gMASK]sop) even when skipping special
    // tokens (they are not transformers specials): that is decoding *without* skipping here.
    let glm3 = dir.ends_with("chatglm3");
    // The InternLM/Baichuan classes decode special tokens with a space before each run of them
    // (convert_tokens_to_string), which no `tokenizers` decoder does: for ids with specials the
    // decode is compared without spaces (the documented inexact case).
    let spacing_quirk = matches!(
        class,
        "InternLMTokenizer" | "InternLM2Tokenizer" | "BaichuanTokenizer"
    );
    let t = &tok.tokenizer;
    let specials: Vec<u32> = t
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, a)| a.special)
        .map(|(id, _)| id)
        .collect();
    let cases = g["cases"].as_array().unwrap();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let what = format!("{} {text:?}", dir.display());
        let got = t
            .encode(text, true)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.get_ids(), ids(&c["ids"]), "{what}: tok(text)");
        let plain = t.encode(text, false).unwrap();
        assert_eq!(
            plain.get_ids(),
            ids(&c["ids_plain"]),
            "{what}: add_special_tokens=False"
        );
        let decoded = t.decode(&ids(&c["ids_plain"]), false).unwrap();
        let want = c["decoded"].as_str().unwrap();
        if spacing_quirk && plain.get_ids().iter().any(|i| specials.contains(i)) {
            assert_eq!(
                decoded.replace(' ', ""),
                want.replace(' ', ""),
                "{what}: decode"
            );
        } else {
            assert_eq!(decoded, want, "{what}: decode");
        }
        let skip = t.decode(&ids(&c["ids"]), !glm3).unwrap();
        assert_eq!(
            skip,
            c["decoded_skip"].as_str().unwrap(),
            "{what}: decode(skip_special_tokens)"
        );
    }
    cases.len()
}

#[test]
fn qwen_v1_tiktoken_matches_the_original_class() {
    assert!(check_goldens(&fixture("qwen"), &fixture("qwen").join("golden.json")) > 20);
}

#[test]
fn sentencepiece_families_match_the_original_classes() {
    for fam in [
        "internlm",
        "internlm2",
        "baichuan2",
        "chatglm2",
        "chatglm3",
        "nfkc_rmws",
    ] {
        assert!(
            check_goldens(&fixture(fam), &fixture(fam).join("golden.json")) > 20,
            "{fam}"
        );
    }
}

#[test]
fn chatglm_specials_sit_after_the_vocabulary_and_prefix_the_text() {
    for fam in ["chatglm2", "chatglm3"] {
        let g: Value =
            serde_json::from_str(&fs::read_to_string(fixture(fam).join("golden.json")).unwrap())
                .unwrap();
        let tok = load(&fixture(fam)).tokenizer;
        for (s, id) in g["specials"].as_object().unwrap() {
            assert_eq!(
                tok.token_to_id(s),
                Some(id.as_u64().unwrap() as u32),
                "{fam} {s}"
            );
        }
        let enc = tok.encode("hi", true).unwrap();
        let prefix = [
            tok.token_to_id("[gMASK]").unwrap(),
            tok.token_to_id("sop").unwrap(),
        ];
        assert_eq!(enc.get_ids()[..2], prefix, "{fam}");
        // The class decodes unk/bos/eos to "" (convert_id_to_token): every answer of a real
        // ChatGLM ends with eos, which must not show as `</s>`.
        let hi = tok.encode("hi", false).unwrap().get_ids().to_vec();
        for id in [0u32, 1, 2] {
            let mut ids = hi.clone();
            ids.push(id);
            assert_eq!(tok.decode(&ids, true).unwrap(), "hi", "{fam}: id {id}");
        }
        // Typed as text, `</s>` stays text.
        let typed = tok.encode("</s>", false).unwrap();
        assert!(
            !typed.get_ids().contains(&2),
            "{fam}: {:?}",
            typed.get_ids()
        );
    }
}

/// A copy of a fixture directory with one file replaced (or removed when `bytes` is None).
fn variant(fam: &str, file: &str, bytes: Option<&[u8]>) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in fs::read_dir(fixture(fam)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    match bytes {
        Some(b) => fs::write(tmp.path().join(file), b).unwrap(),
        None => fs::remove_file(tmp.path().join(file)).unwrap(),
    }
    tmp
}

fn load_err(dir: &Path) -> TokenizerError {
    match load_tokenizer(dir) {
        Ok(Some(_)) => panic!("{}: loaded", dir.display()),
        Ok(None) => panic!("{}: nothing found", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_or_corrupt_sentencepiece_models_are_errors_naming_the_offset() {
    let model = fs::read(fixture("internlm").join("tokenizer.model")).unwrap();
    for cut in [model.len() / 2, model.len() - 3, 7] {
        let d = variant("internlm", "tokenizer.model", Some(&model[..cut]));
        let e = load_err(d.path());
        let msg = e.to_string();
        assert!(matches!(e, TokenizerError::Corrupt { .. }), "{cut}: {msg}");
        assert!(
            msg.contains("tokenizer.model") && msg.contains("byte offset"),
            "{msg}"
        );
    }
    let d = variant("internlm", "tokenizer.model", Some(b"\xff\xff\xff garbage"));
    assert!(matches!(load_err(d.path()), TokenizerError::Corrupt { .. }));
    let lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n";
    let msg = load_err(variant("chatglm3", "tokenizer.model", Some(lfs)).path()).to_string();
    assert!(msg.contains("Git LFS pointer"), "{msg}");
    let msg = load_err(variant("internlm", "tokenizer.model", Some(b"")).path()).to_string();
    assert!(msg.contains("no pieces"), "{msg}");
}

#[test]
fn corrupt_tiktoken_lines_are_errors_naming_the_line() {
    let text = fs::read_to_string(fixture("qwen").join("qwen.tiktoken")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            {
                let mut l = lines.clone();
                l[9] = "not*base64 9".into();
                l
            },
            "line 10",
        ),
        (
            {
                let mut l = lines.clone();
                l[4] = "IQ==".into();
                l
            },
            "line 5",
        ),
        (
            {
                let mut l = lines.clone();
                l[6] = "IQ== x".into();
                l
            },
            "line 7",
        ),
        (
            {
                let mut l = lines.clone();
                l[300] = l[300].replace(" 300", " 299");
                l
            },
            "line 301",
        ),
        (
            {
                let mut l = lines.clone();
                l.remove(500);
                l
            },
            "rank 500",
        ),
        (
            {
                let mut l = lines.clone();
                l.remove(33);
                l.truncate(3000);
                l
            },
            "rank 33",
        ),
    ];
    for (l, at) in cases {
        let d = variant("qwen", "qwen.tiktoken", Some(l.join("\n").as_bytes()));
        let e = load_err(d.path());
        let msg = e.to_string();
        assert!(matches!(e, TokenizerError::Corrupt { .. }), "{at}: {msg}");
        assert!(
            msg.contains("qwen.tiktoken") && msg.contains(at),
            "{at}: {msg}"
        );
    }
    // A table without all 256 single bytes cannot encode every text.
    lines.retain(|l| !l.starts_with("AA== "));
    let renum: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{} {i}", l.split(' ').next().unwrap()))
        .collect();
    let d = variant("qwen", "qwen.tiktoken", Some(renum.join("\n").as_bytes()));
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("0x00"), "{msg}");
}

/// An edit of a parsed tokenizer_config.json.
type ConfigEdit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;

#[test]
fn unknown_classes_and_unconverted_settings_are_refused_by_name() {
    let cfg = |fam: &str, edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let path = fixture(fam).join("tokenizer_config.json");
        let mut v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        variant(fam, "tokenizer_config.json", Some(v.to_string().as_bytes()))
    };
    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        (
            "internlm",
            Box::new(|m| {
                m.insert("tokenizer_class".into(), "LlamaTokenizer".into());
            }),
            "`LlamaTokenizer`",
        ),
        (
            "internlm",
            Box::new(|m| {
                m.remove("tokenizer_class");
            }),
            "tokenizer_class",
        ),
        (
            "qwen",
            Box::new(|m| {
                m.insert("tokenizer_class".into(), "GPT2Tokenizer".into());
            }),
            "`GPT2Tokenizer`",
        ),
        (
            "baichuan2",
            Box::new(|m| {
                m.insert("clean_up_tokenization_spaces".into(), true.into());
            }),
            "clean_up_tokenization_spaces",
        ),
        (
            "chatglm3",
            Box::new(|m| {
                m.insert("encode_special_tokens".into(), true.into());
            }),
            "encode_special_tokens",
        ),
        (
            "internlm2",
            Box::new(|m| {
                m.insert(
                    "sp_model_kwargs".into(),
                    serde_json::json!({"enable_sampling": true}),
                );
            }),
            "sp_model_kwargs",
        ),
    ];
    for (fam, edit, field) in cases {
        let d = cfg(fam, &*edit);
        let e = load_err(d.path());
        let msg = e.to_string();
        assert!(
            matches!(e, TokenizerError::Unsupported { .. }),
            "{fam} {field}: {msg}"
        );
        assert!(
            msg.contains("tokenizer_config.json") && msg.contains(field),
            "{msg}"
        );
    }
    let d = variant("chatglm2", "tokenizer_config.json", None);
    let msg = load_err(d.path()).to_string();
    assert!(
        msg.contains("tokenizer.model") && msg.contains("tokenizer_config.json"),
        "{msg}"
    );
    let d = variant("internlm", "tokenizer_config.json", Some(b"{ not json"));
    let msg = load_err(d.path()).to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("line 1"),
        "{msg}"
    );
}

/// Protobuf helpers to craft sentencepiece models the trainer would not make.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
    varint(field << 3, out);
    varint(v, out);
}

fn crafted(pieces: &[(&str, u64)], model_type: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (p, kind) in pieces {
        let mut m = Vec::new();
        field_bytes(1, p.as_bytes(), &mut m);
        m.push(2 << 3 | 5);
        m.extend_from_slice(&(-1.0f32).to_le_bytes());
        field_varint(3, *kind, &mut m);
        field_bytes(1, &m, &mut out);
    }
    let mut t = Vec::new();
    field_varint(3, model_type, &mut t);
    field_bytes(2, &t, &mut out);
    out
}

#[test]
fn unsupported_sentencepiece_models_are_refused_by_field() {
    let base = [
        ("<unk>", 2),
        ("<s>", 3),
        ("</s>", 3),
        ("a", 1),
        ("b", 1),
        ("ab", 1),
    ];
    // The crafted BPE model itself loads (the reader handles it; sentencepiece's defaults: a
    // dummy prefix, here an unknown piece, and no byte fallback) ...
    let d = variant("internlm", "tokenizer.model", Some(&crafted(&base, 2)));
    let tok = load(d.path()).tokenizer;
    assert_eq!(tok.encode("ab", false).unwrap().get_ids(), [0, 5]);
    // ... and each unsupported variant is named.
    let mut unused = base.to_vec();
    unused.push(("ba", 5));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (crafted(&base, 1), "UNIGRAM"),
        (crafted(&base, 3), "WORD"),
        (crafted(&base, 4), "CHAR"),
        (crafted(&unused, 2), "UNUSED"),
        (crafted(&[("a", 1), ("<unk>", 2)], 2), "unk_id"),
        (crafted(&[("<unk>", 2), ("a", 1), ("a", 1)], 2), "repeats"),
    ];
    for (bytes, what) in cases {
        let d = variant("internlm", "tokenizer.model", Some(&bytes));
        let msg = load_err(d.path()).to_string();
        assert!(
            msg.contains("tokenizer.model") && msg.contains(what),
            "{what}: {msg}"
        );
    }
}

/// The real qwen.tiktoken and InternLM tokenizer.model (not committed) against goldens from the
/// original classes: `python make_tokenizer_fixtures.py --check-real` writes them to
/// /tmp/rabbit-real-tokenizers. Run with `--ignored`; the remote-code dir is
/// `REMOTE_CODE_SRC` (default /work/notes/issue13/src).
#[test]
#[ignore = "needs the real vocabularies and goldens made by make_tokenizer_fixtures.py --check-real"]
fn real_vocabularies() {
    let src = PathBuf::from(
        std::env::var("REMOTE_CODE_SRC").unwrap_or_else(|_| "/work/notes/issue13/src".into()),
    );
    let goldens = Path::new("/tmp/rabbit-real-tokenizers");
    for (fam, dir) in [("qwen", "qwen"), ("internlm", "internlm")] {
        let n = check_goldens(&src.join(dir), &goldens.join(fam).join("golden.json"));
        eprintln!("{fam}: {n} texts identical to the original class");
    }
}
