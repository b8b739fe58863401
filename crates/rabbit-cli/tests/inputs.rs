//! The command line under hostile conditions: closed or full stdout, negative numbers, flags
//! that cannot go together, outputs that cannot be written, absurd sizes. Each must end with a
//! clear message and a non-zero exit (or, for a closed pipe, quietly), never a panic or a hang.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{
    assert_clean_failure, assert_ok, last_json_line, no_panic, rabbit, run, stderr, synth,
    tiny_model,
};
use serde_json::Value;

fn generate(model: &Path, extra: &[&str]) -> Command {
    let mut c = rabbit();
    c.args(["generate", "--device", "cpu", "--model"])
        .arg(model)
        .args(extra);
    c
}

/// `rabbit generate … | head -c 1`: the reader leaves, rabbit ends quietly with success.
#[test]
fn a_closed_stdout_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    for args in [
        &["--prompt", "hello there", "--max-new-tokens", "64"][..],
        &[
            "--input-ids",
            "1,2,3",
            "--input-ids",
            "4,5",
            "--max-new-tokens",
            "8",
        ][..],
    ] {
        let mut child = generate(&model, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        let mut out = child.stdout.take().unwrap();
        let _ = out.read(&mut first);
        drop(out);
        let o = child.wait_with_output().unwrap();
        no_panic(&o);
        assert!(o.status.success(), "{:?}: {}", o.status, stderr(&o));
        assert!(!stderr(&o).contains("error"), "{}", stderr(&o));
    }
    // `info` prints several lines: the same.
    let mut child = rabbit()
        .args(["info", "--device", "cpu", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    no_panic(&o);
    assert_ok(&o);
}

/// A full disk behind stdout is an error worth a message.
#[test]
fn a_full_stdout_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    for args in [
        &["--prompt", "hello", "--max-new-tokens", "4"][..],
        &["--input-ids", "1,2", "--max-new-tokens", "2", "--json"][..],
    ] {
        let o = generate(&model, args).stdout(full()).output().unwrap();
        assert_clean_failure(&o, &["writing to standard output"]);
    }
    let o = rabbit()
        .args(["info", "--device", "cpu", "--model"])
        .arg(&model)
        .stdout(full())
        .output()
        .unwrap();
    assert_clean_failure(&o, &["writing to standard output"]);
}

/// Wrong values are named by their flag, negative numbers included.
#[test]
fn bad_flag_values_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--input-ids", "1", "--max-new-tokens", "-1"],
            "'-1' for '--max-new-tokens",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--threads",
                "0",
            ],
            "'0' for '--threads",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--threads",
                "many",
            ],
            "'many' for '--threads",
        ),
        (
            &["--input-ids", "1", "--max-new-tokens", "2", "--top-k", "-1"],
            "'-1' for '--top-k",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--device-memory-budget",
                "-1GiB",
            ],
            "'-1GiB' for '--device-memory-budget",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--device-memory-budget",
                "lots",
            ],
            "'lots' for '--device-memory-budget",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--device",
                "gpu7",
            ],
            "'gpu7' for '--device",
        ),
        (
            &["--input-ids", "1", "--max-new-tokens", "2", "--dtype", "f8"],
            "'f8' for '--dtype",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--compression",
                "3bit",
            ],
            "'3bit' for '--compression",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--prefetch",
                "0",
            ],
            "'0' for '--prefetch",
        ),
        (
            &["--input-ids", "1", "--max-new-tokens", "2", "--stop", ""],
            "'--stop",
        ),
        (
            &["--input-ids", "1,2", "--chat", "--max-new-tokens", "2"],
            "--chat",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "18446744073709551615",
            ],
            "context too long",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--profile-json",
                "/nonexistent-dir/p.json",
            ],
            "--profile-json /nonexistent-dir/p.json: directory /nonexistent-dir does not exist",
        ),
        (
            &[
                "--input-ids",
                "1",
                "--max-new-tokens",
                "2",
                "--dump-logits",
                "/",
            ],
            "is a directory",
        ),
    ];
    for (args, needle) in cases {
        let o = if args.contains(&"--device") {
            rabbit()
                .args(["generate", "--model"])
                .arg(&model)
                .args(*args)
                .output()
                .unwrap()
        } else {
            generate(&model, args).output().unwrap()
        };
        assert_clean_failure(&o, &[*needle]);
        // Refused before any model work.
        if !needle.contains("context") {
            assert!(
                !stderr(&o).contains("plan:"),
                "{args:?} loaded the model first"
            );
        }
    }
}

/// A prompt far longer than the context is refused before it is tokenised, with a message that
/// says why (the tokenizer's longest token bounds the text of a context).
#[test]
fn a_huge_prompt_is_refused_before_tokenising() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    synth(
        &model,
        &[
            "--arch",
            "qwen2",
            "--preset",
            "tiny",
            "--max-position",
            "64",
        ],
    );
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::len);
    let added = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["content"].as_str().unwrap().len());
    let longest = vocab.chain(added).max().unwrap();
    let big = "a".repeat(64 * longest * 4 + 1);
    let o = generate(&model, &["--max-new-tokens", "1", "--prompt", &big])
        .output()
        .unwrap();
    assert_clean_failure(&o, &["more than any text of 64 tokens"]);
    // Just under the bound it is tokenised, and then the ordinary context check answers.
    let o = generate(
        &model,
        &["--max-new-tokens", "1", "--prompt", &"a b ".repeat(100)],
    )
    .output()
    .unwrap();
    assert_clean_failure(&o, &["max_position_embeddings 64"]);
}

/// `--prefetch` beyond the layer count reads no further ahead than there are layers.
#[test]
fn prefetch_is_capped_at_the_layer_count() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let run = |prefetch: &str| -> Value {
        let o = generate(
            &model,
            &[
                "--input-ids",
                "1,2,3",
                "--max-new-tokens",
                "2",
                "--json",
                "--resident-layers",
                "0",
                "--prefetch",
                prefetch,
            ],
        )
        .output()
        .unwrap();
        assert_ok(&o);
        last_json_line(&o)
    };
    let capped = run("1000");
    let at_layers = run("2");
    assert_eq!(
        capped["memory"]["staging_bytes"], at_layers["memory"]["staging_bytes"],
        "a 2-layer model stages at most 2 layers ahead"
    );
    assert_eq!(
        capped["sequences"][0]["output_ids"],
        at_layers["sequences"][0]["output_ids"]
    );
}

/// `--threads`: a fixed count is used as given (the same tokens as the adaptive default, which
/// reports its policy and the mean count the layers ran with).
#[test]
fn threads_fixed_or_auto_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let run = |threads: Option<&str>| -> Value {
        let mut cmd = generate(
            &model,
            &["--input-ids", "1,2,3", "--max-new-tokens", "3", "--json"],
        );
        if let Some(t) = threads {
            cmd.args(["--threads", t]);
        }
        let o = cmd.output().unwrap();
        assert_ok(&o);
        last_json_line(&o)
    };
    let auto = run(None);
    let one = run(Some("1"));
    assert_eq!(auto["threads"]["policy"], "auto");
    let mean = auto["threads"]["mean"].as_f64().unwrap();
    assert!(mean >= 1.0, "{mean}");
    assert_eq!(one["threads"]["policy"], "1");
    assert_eq!(one["threads"]["current"], 1);
    assert_eq!(one["threads"]["mean"].as_f64(), Some(1.0));
    assert_eq!(
        auto["sequences"][0]["output_ids"],
        one["sequences"][0]["output_ids"]
    );
}

/// Bench sizes that cannot fit are refused before the workload is built (they used to abort
/// the process allocating prompt ids).
#[test]
fn bench_refuses_sizes_that_cannot_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    for (args, needle) in [
        (
            &["--batch", "100000000000"][..],
            "--batch 100000000000 x 48 positions needs",
        ),
        (&["--prompt-len", "99999999999"][..], "context too long"),
        (&["--repeat", "0"][..], "--repeat >= 1"),
    ] {
        let o = rabbit()
            .args(["bench", "--device", "cpu", "--no-baseline", "--model"])
            .arg(&model)
            .args(args)
            .output()
            .unwrap();
        assert_clean_failure(&o, &[needle]);
    }
}

/// A hostile chat template (100 MB of output) stops at what could still fit the context, long
/// before rendering it all.
#[test]
fn a_runaway_chat_template_stops_at_the_context_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let cfg_path = model.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = Value::String(
        "{% for i in range(10000) %}{% for j in range(1000) %}0123456789{% endfor %}{% endfor %}"
            .into(),
    );
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let o = generate(
        &model,
        &["--chat", "--prompt", "hi", "--max-new-tokens", "1"],
    )
    .output()
    .unwrap();
    assert_clean_failure(&o, &["rendered more than"]);
    // The bound is the context's, far below the 64 MiB library default.
    let err = stderr(&o);
    let n: u64 = err
        .split("rendered more than ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in: {err}"));
    assert!(n < 64 << 20, "{err}");
}

/// A closed stdout does not cost the files asked for: `--dump-logits` still gets the whole run.
#[test]
fn a_closed_stdout_still_writes_the_requested_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let dump = tmp.path().join("l.st");
    let mut child = generate(
        &model,
        &[
            "--prompt",
            "hello there",
            "--max-new-tokens",
            "16",
            "--dump-logits",
        ],
    )
    .arg(&dump)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    no_panic(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&dump).expect("--dump-logits written");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rows = st.tensor("logits.0").unwrap().shape()[0];
    assert!(rows >= 1, "{rows} rows");
}

/// `--stop` while streaming to a terminal-like stdout prints exactly the text `--json` reports:
/// cut before the stop string, even when it arrives split across tokens.
#[test]
fn streamed_output_is_cut_before_the_stop_string() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 3);
    let args = ["--prompt", "hello there", "--max-new-tokens", "24"];
    let o = generate(&model, &args).arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let full = last_json_line(&o)["sequences"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    // A stop string from the middle of the answer.
    let stop: String = chars[6..9].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let o = generate(&model, &args)
        .args(["--stop", &stop])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{want}\n"));
}

/// A checkpoint tensor of another shape than config.json implies is refused before the split
/// writes anything — with `--delete-original` too, which must never remove the weights of a
/// split that could not load.
#[test]
fn a_tensor_of_the_wrong_shape_is_refused_before_splitting() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    synth(&model, &["--arch", "qwen1", "--preset", "tiny"]);
    // Transpose one MLP matrix in place (a checkpoint that does not match its config).
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "transformer.h.0.mlp.w1.weight";
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (n, t) in st.tensors() {
        let t = if n == name {
            let s = t.shape().to_vec();
            safetensors::tensor::TensorView::new(t.dtype(), vec![s[1], s[0]], t.data()).unwrap()
        } else {
            t
        };
        tensors.push((n, t));
    }
    let out = safetensors::serialize(tensors, None).unwrap();
    drop(st);
    std::fs::write(&path, out).unwrap();
    let o = run(rabbit()
        .args(["split", "--delete-original", "--model"])
        .arg(&model));
    assert_clean_failure(&o, &[name, "config.json implies"]);
    assert!(path.exists(), "the original weights are still there");
    assert!(!model.join("rabbit-split").join("manifest.json").exists());
}
