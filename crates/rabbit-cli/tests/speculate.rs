//! End-to-end tests of the step-engine flags and the drafts made for them: `--prompt-lookup`,
//! `--draft-model`, `--draft-tokens`, `--adaptive-draft`, `--prefill-chunk`, and
//! `rabbit synth --like`.

mod common;

use std::path::Path;

use common::{
    assert_clean_failure, assert_ok, expected, fixture, ids_csv, last_json_line, rabbit, run,
};
use serde_json::Value;

/// Speculative decoding from the command line: prompt lookup and a draft model (the model
/// itself) give plain greedy's tokens and report their counters; bad settings are refused by
/// name, a draft with another vocabulary too.
#[test]
fn speculation_flags_keep_greedy_tokens_and_refuse_bad_settings() {
    let exp = expected("qwen2_tied_f32");
    let seq = &exp["sequences"][0];
    let model = fixture("qwen2_tied_f32");
    let tmp = tempfile::tempdir().unwrap();
    let gen = |extra: &[&str]| {
        run(rabbit()
            .args(["generate", "--device", "cpu", "--dtype", "f32", "--json"])
            .args(["--max-new-tokens", "12", "--no-split"])
            .args(["--input-ids", &ids_csv(&seq["input_ids"])])
            .arg("--model")
            .arg(&model)
            .args(extra))
    };
    let want: Vec<Value> = seq["greedy_output_ids"].as_array().unwrap()[..12].to_vec();
    let model_str = model.to_str().unwrap();
    for extra in [
        vec!["--prompt-lookup"],
        vec![
            "--prompt-lookup",
            "2",
            "--draft-tokens",
            "6",
            "--prefill-chunk",
            "3",
        ],
        vec!["--draft-model", model_str, "--draft-tokens", "3"],
        vec!["--prompt-lookup", "--adaptive-draft", "--draft-tokens", "1"],
    ] {
        let o = gen(&extra);
        assert_ok(&o);
        let j = last_json_line(&o);
        assert_eq!(
            j["sequences"][0]["output_ids"],
            Value::Array(want.clone()),
            "{extra:?}"
        );
        let t = &j["timings"];
        for key in [
            "sweeps",
            "draft_tokens",
            "accepted_tokens",
            "tokens_per_sweep",
        ] {
            assert!(t[key].is_number(), "{extra:?}: timings.{key} missing: {t}");
        }
        if extra[0] == "--draft-model" {
            // The model drafting for itself: every draft accepted, fewer sweeps than tokens.
            assert_eq!(t["accepted_tokens"], t["draft_tokens"], "{t}");
            assert!(t["sweeps"].as_u64().unwrap() < 12, "{t}");
        }
    }
    let other = fixture("qwen2_untied_f32");
    let other_str = other.to_str().unwrap();
    for (extra, needle) in [
        (
            vec!["--draft-tokens", "4"],
            "--draft-tokens needs --prompt-lookup or --draft-model",
        ),
        (
            vec!["--prompt-lookup", "--draft-tokens", "0"],
            "--draft-tokens",
        ),
        (
            vec!["--prompt-lookup", "--draft-tokens", "99"],
            "--draft-tokens",
        ),
        (vec!["--prompt-lookup", "0"], "--prompt-lookup"),
        (vec!["--prefill-chunk", "0"], "--prefill-chunk"),
        (
            vec!["--prompt-lookup", "--draft-model", model_str],
            "cannot be used with",
        ),
        (
            vec!["--draft-model", other_str],
            "vocabulary has 320 tokens",
        ),
        (
            vec!["--draft-model", tmp.path().to_str().unwrap()],
            "--draft-model",
        ),
    ] {
        let o = gen(&extra);
        assert_clean_failure(&o, &[needle]);
    }
}

/// `rabbit synth --like`: a noise-free copy decodes the target's tokens, a 1-layer noisy copy is
/// a valid smaller model that drafts for it, and bad options are refused without writing.
#[test]
fn synth_like_derives_drafts_from_a_target() {
    let exp = expected("qwen2_tied_f32");
    let seq = &exp["sequences"][0];
    let target = fixture("qwen2_tied_f32");
    let tmp = tempfile::tempdir().unwrap();
    let like = |out: &Path, extra: &[&str]| {
        run(rabbit()
            .args(["synth", "--like"])
            .arg(&target)
            .arg("--out")
            .arg(out)
            .args(extra))
    };
    let gen = |model: &Path, extra: &[&str]| {
        let o = run(rabbit()
            .args([
                "generate",
                "--device",
                "cpu",
                "--dtype",
                "f32",
                "--json",
                "--no-split",
            ])
            .args([
                "--max-new-tokens",
                "8",
                "--input-ids",
                &ids_csv(&seq["input_ids"]),
            ])
            .arg("--model")
            .arg(model)
            .args(extra));
        assert_ok(&o);
        last_json_line(&o)["sequences"][0]["output_ids"].clone()
    };
    let copy = tmp.path().join("copy");
    assert_ok(&like(&copy, &[]));
    let want = Value::Array(seq["greedy_output_ids"].as_array().unwrap()[..8].to_vec());
    assert_eq!(gen(&copy, &[]), want);
    let small = tmp.path().join("small");
    assert_ok(&like(
        &small,
        &["--layers", "1", "--noise", "0.05", "--seed", "2"],
    ));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(small.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 1);
    assert_ne!(
        gen(&small, &[]),
        want,
        "a 1-layer noisy copy is another model"
    );
    let small_str = small.to_str().unwrap();
    assert_eq!(gen(&target, &["--draft-model", small_str]), want);
    // Refusals: nothing written, a user's directory untouched.
    let user = tmp.path().join("user");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "mine").unwrap();
    let fresh = tmp.path().join("fresh");
    for (out, extra, needle) in [
        (&fresh, vec!["--layers", "3"], "has 2 decoder layers"),
        (&fresh, vec!["--layers", "0"], "--layers"),
        (&fresh, vec!["--noise", "-0.5"], "--noise"),
        (&fresh, vec!["--noise", "nan"], "--noise"),
        (&fresh, vec!["--preset", "tiny"], "cannot be used with"),
        (&user, vec![], "not empty"),
    ] {
        let o = like(out, &extra);
        assert_clean_failure(&o, &[needle]);
    }
    assert!(!fresh.exists(), "a refused derivation leaves no directory");
    assert_eq!(
        std::fs::read_to_string(user.join("notes.txt")).unwrap(),
        "mine"
    );
    let o = run(rabbit()
        .args(["synth", "--arch", "qwen2", "--noise", "0.1", "--out"])
        .arg(&fresh));
    assert_clean_failure(&o, &["--noise needs --like"]);
}
