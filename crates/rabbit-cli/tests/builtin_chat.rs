//! Chat with the remote-code families whose checkpoints ship no chat_template (QWen v1 Chat,
//! ChatGLM3, Baichuan 2 Chat): `generate --chat` builds the prompt id for id as the family's own
//! Python code does (the goldens of `make_builtin_chat_goldens.py`), on a synthetic checkpoint
//! carrying the family's tokenizer (`qwen.tiktoken` / `tokenizer.model`, no tokenizer.json);
//! `rabbit template` prints it; a model with neither a template nor a known format is refused.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, assert_ok, last_json_line, rabbit, run, stdout, synth};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rabbit-models/tests/fixtures")
}

fn goldens() -> Value {
    let p = fixtures().join("chat/builtin_goldens.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A tiny `arch` checkpoint with the tokenizer fixture `tok` and the golden family's
/// generation_config.json.
fn model_with(arch: &str, tok: &str, family: &Value, dir: &Path) {
    synth(
        dir,
        &["--arch", arch, "--preset", "tiny", "--vocab", "4288"],
    );
    for f in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for e in std::fs::read_dir(fixtures().join("tokenizers").join(tok)).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "golden.json" {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    if let Some(g) = family["files"].get("generation_config.json") {
        let mut g = g.clone();
        // Greedy, so the run is short and deterministic.
        g["do_sample"] = Value::Bool(false);
        // QWen's real `<|endoftext|>` (151643) is 4000 in the truncated fixture vocabulary.
        if g["eos_token_id"].as_u64().is_some_and(|e| e >= 4288) {
            g["eos_token_id"] = Value::from(4000);
        }
        std::fs::write(dir.join("generation_config.json"), g.to_string()).unwrap();
    }
}

#[test]
fn generate_chat_builds_the_prompt_as_the_family_code_does() {
    let g = goldens();
    let tmp = tempfile::tempdir().unwrap();
    for (arch, fam, tok) in [
        ("qwen1", "qwen", "qwen"),
        ("chatglm", "chatglm3", "chatglm3"),
        ("baichuan", "baichuan2", "baichuan2"),
    ] {
        let family = &g["families"][fam];
        let dir = tmp.path().join(fam);
        model_with(arch, tok, family, &dir);
        let case = family["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "system")
            .unwrap();
        let (system, user) = (
            case["messages"][0]["content"].as_str().unwrap(),
            case["messages"][1]["content"].as_str().unwrap(),
        );
        let o = run(rabbit()
            .args([
                "generate",
                "--device",
                "cpu",
                "--json",
                "--max-new-tokens",
                "3",
            ])
            .args(["--chat", "--system", system, "--prompt", user, "--model"])
            .arg(&dir));
        assert_ok(&o);
        let got = &last_json_line(&o)["sequences"][0]["input_ids"];
        assert_eq!(got, &case["ids"], "{fam}");

        // The same conversation as `rabbit template` prints it.
        let m = tmp.path().join(format!("{fam}.json"));
        std::fs::write(&m, case["messages"].to_string()).unwrap();
        let o = run(rabbit()
            .args(["template", "--messages"])
            .arg(&m)
            .arg("--model")
            .arg(&dir));
        assert_ok(&o);
        let text = stdout(&o);
        assert!(text.contains(user), "{fam}: {text}");
        if let Some(raw) = case["raw_text"].as_str() {
            assert_eq!(text, raw, "{fam}: QWen's raw_text");
        }
    }
}

#[test]
fn a_model_without_template_or_known_format_is_not_a_chat_model() {
    let g = goldens();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    // QWen's base checkpoints say chat_format "raw": their chat() refuses them.
    let mut family = g["families"]["qwen"].clone();
    family["files"]["generation_config.json"]["chat_format"] = Value::from("raw");
    model_with("qwen1", "qwen", &family, &dir);
    let o = run(rabbit()
        .args(["generate", "--device", "cpu", "--max-new-tokens", "2"])
        .args(["--chat", "--prompt", "hi", "--model"])
        .arg(&dir));
    assert_clean_failure(&o, &["chat_format"]);
}

/// ChatGLM2's format has no system message: `--system` is refused before anything runs, naming
/// the flag.
#[test]
fn a_system_prompt_is_refused_where_the_format_has_none() {
    let g = goldens();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    model_with("chatglm", "chatglm2", &g["families"]["chatglm2"], &dir);
    let o = run(rabbit()
        .args(["generate", "--device", "cpu", "--max-new-tokens", "2"])
        .args([
            "--chat",
            "--system",
            "Be brief.",
            "--prompt",
            "hi",
            "--model",
        ])
        .arg(&dir));
    assert_clean_failure(&o, &["--system", "ChatGLM2"]);
    let o = run(rabbit()
        .args([
            "chat",
            "--device",
            "cpu",
            "--system",
            "Be brief.",
            "--model",
        ])
        .arg(&dir));
    assert_clean_failure(&o, &["--system", "ChatGLM2"]);
}
