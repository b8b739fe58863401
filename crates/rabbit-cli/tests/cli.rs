//! End-to-end tests of the `rabbit` binary: linkage, the generate contract (JSON, logits dump,
//! text with a tokenizer), split/verify, and clear errors for bad input. Chat and templates are in
//! `chat.rs`, bench/info/profile and the streaming memory proof in `bench.rs`, the step-engine
//! flags and `synth --like` in `speculate.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    assert_clean_failure, assert_ok, expected, fixture, flip_byte, generate_fixture, ids_csv,
    last_json_line, rabbit, run, stderr, stdout, synth,
};
use serde_json::Value;

fn ldd(path: &Path) -> String {
    let o = Command::new("ldd")
        .arg(path)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("ldd");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The binary and the test executables find libtorch without LD_LIBRARY_PATH and keep
/// libtorch_cuda.so linked (else CUDA would silently never initialise on a GPU machine).
#[test]
fn binaries_find_libtorch_and_keep_libtorch_cuda() {
    for exe in [
        PathBuf::from(env!("CARGO_BIN_EXE_rabbit")),
        std::env::current_exe().unwrap(),
    ] {
        let out = ldd(&exe);
        assert!(
            !out.contains("not found"),
            "{}: unresolved libraries:\n{out}",
            exe.display()
        );
        assert!(
            out.contains("libtorch_cpu.so"),
            "{}: libtorch_cpu missing:\n{out}",
            exe.display()
        );
        // A CPU-only libtorch has no libtorch_cuda.so to keep; the PyPI build this project
        // installs does.
        let libtorch_dir = out
            .lines()
            .find(|l| l.contains("libtorch_cpu.so"))
            .and_then(|l| l.split("=>").nth(1))
            .and_then(|p| p.split_whitespace().next())
            .map(|p| Path::new(p).parent().unwrap().to_path_buf())
            .unwrap();
        if libtorch_dir.join("libtorch_cuda.so").exists() {
            assert!(
                out.contains("libtorch_cuda.so"),
                "{}: libtorch_cuda dropped:\n{out}",
                exe.display()
            );
        }
    }
    let o = run(rabbit().arg("--version"));
    assert_ok(&o);
}

#[test]
fn generate_json_contract_and_logits_dump() {
    let exp = expected("qwen2_tied_f32");
    let seq = &exp["sequences"][0];
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("logits.safetensors");
    let o = run(rabbit()
        .args([
            "generate",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--json",
            "--max-new-tokens",
            "32",
        ])
        .args([
            "--model".as_ref(),
            fixture("qwen2_tied_f32").as_os_str(),
            "--split-dir".as_ref(),
            tmp.path().join("split").as_os_str(),
            "--input-ids".as_ref(),
            ids_csv(&seq["input_ids"]).as_ref(),
            "--dump-logits".as_ref(),
            dump.as_os_str(),
        ]));
    assert_ok(&o);
    let v = last_json_line(&o);
    let s = &v["sequences"][0];
    assert_eq!(s["input_ids"], seq["input_ids"]);
    assert_eq!(
        s["output_ids"], seq["greedy_output_ids"],
        "output_ids are only the new tokens"
    );
    assert!(s["text"].is_null(), "no tokenizer: text is null");
    for k in ["prefill_s", "decode_s_per_token", "prefill_tokens_per_s"] {
        assert!(v["timings"][k].as_f64().is_some(), "timings.{k}");
    }
    assert!(v["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0);

    let bytes = std::fs::read(&dump).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits.0").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(t.shape(), &[32, 256]);
    let want_bytes =
        std::fs::read(fixture("qwen2_tied_f32").join("expected_logits.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want_bytes).unwrap();
    let f = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<_>>()
    };
    let (got, want) = (f(t.data()), f(want.tensor("logits.0").unwrap().data()));
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-4, "dumped logits differ from transformers by {d}");
}

#[test]
fn several_input_ids_make_a_batch() {
    let exp = expected("qwen2_batch");
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = rabbit();
    cmd.args([
        "generate",
        "--device",
        "cpu",
        "--json",
        "--max-new-tokens",
        "8",
        "--model",
    ])
    .arg(fixture("qwen2_batch"))
    .arg("--split-dir")
    .arg(tmp.path());
    for s in exp["sequences"].as_array().unwrap() {
        cmd.arg("--input-ids").arg(ids_csv(&s["input_ids"]));
    }
    let o = run(&mut cmd);
    assert_ok(&o);
    let v = last_json_line(&o);
    for (i, s) in exp["sequences"].as_array().unwrap().iter().enumerate() {
        let want: Vec<Value> = s["greedy_output_ids"].as_array().unwrap()[..8].to_vec();
        assert_eq!(
            v["sequences"][i]["output_ids"].as_array().unwrap(),
            &want,
            "row {i}"
        );
    }
}

#[test]
fn split_then_verify_names_a_damaged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("split");
    let o = run(rabbit()
        .args(["split", "--model"])
        .arg(fixture("qwen2_untied_f32"))
        .arg("--out")
        .arg(&out));
    assert_ok(&o);
    let o = run(rabbit().args(["split", "--verify"]).arg(&out));
    assert_ok(&o);
    // Second run reuses.
    let o = run(rabbit()
        .args(["split", "--model"])
        .arg(fixture("qwen2_untied_f32"))
        .arg("--out")
        .arg(&out));
    assert!(stdout(&o).contains("reused"), "{}", stdout(&o));
    // Flip one byte of a layer's data.
    flip_byte(&out.join("layer.001.safetensors"));
    let o = run(rabbit().args(["split", "--verify"]).arg(&out));
    assert_clean_failure(&o, &["layer.001.safetensors"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn generate_one_token(model: &Path) -> Output {
    run(rabbit()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "1",
            "--input-ids",
            "1",
            "--model",
        ])
        .arg(model))
}

#[test]
fn bad_inputs_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let split = tmp.path().join("split");
    // Malformed ids.
    let o = generate_fixture(&["--max-new-tokens", "2", "--input-ids", "1,x,3"], &split);
    assert_clean_failure(&o, &["--input-ids"]);
    // Token id beyond the vocabulary.
    let o = generate_fixture(
        &["--max-new-tokens", "2", "--input-ids", "1,999999"],
        &split,
    );
    assert_clean_failure(&o, &["token id 999999 is out of range"]);
    // Prompt with no tokenizer.
    let o = generate_fixture(&["--max-new-tokens", "2", "--prompt", "hello"], &split);
    assert_clean_failure(&o, &["tokenizer"]);
    // Prompt longer than the context (max_position_embeddings 512).
    let long = vec!["1"; 600].join(",");
    let o = generate_fixture(&["--max-new-tokens", "2", "--input-ids", &long], &split);
    assert_clean_failure(&o, &["max_position_embeddings 512"]);
    // Unknown dtype and device.
    let o = generate_fixture(
        &["--max-new-tokens", "2", "--input-ids", "1", "--dtype", "f8"],
        &split,
    );
    assert_clean_failure(&o, &["unknown dtype `f8`"]);
    let o = generate_fixture(
        &[
            "--max-new-tokens",
            "2",
            "--input-ids",
            "1",
            "--device",
            "tpu",
        ],
        &split,
    );
    assert_clean_failure(&o, &["unknown device `tpu`"]);
    if !Path::new("/dev/nvidia0").exists() {
        let o = generate_fixture(
            &[
                "--max-new-tokens",
                "2",
                "--input-ids",
                "1",
                "--device",
                "cuda",
            ],
            &split,
        );
        assert_clean_failure(&o, &["CUDA is not available"]);
    }
    // Missing model directory.
    let o = run(rabbit().args([
        "generate",
        "--model",
        "/nonexistent/model",
        "--max-new-tokens",
        "1",
        "--input-ids",
        "1",
    ]));
    assert_clean_failure(&o, &["/nonexistent/model"]);

    // Unknown and not-yet-supported architectures.
    for (arch, needle) in [
        ("FancyNetForCausalLM", "unknown architecture"),
        ("BaiChuanForCausalLM", "not yet supported"),
    ] {
        let dir = tmp.path().join(arch);
        copy_dir(&fixture("qwen2_tied_f32"), &dir);
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        std::fs::write(
            dir.join("config.json"),
            cfg.replace("Qwen2ForCausalLM", arch),
        )
        .unwrap();
        let o = generate_one_token(&dir);
        assert_clean_failure(&o, &[needle]);
        assert!(stderr(&o).contains(arch));
    }
    // A config field that changes the numerics and that rabbitllm does not implement.
    let dir = tmp.path().join("quantized");
    copy_dir(&fixture("qwen2_tied_f32"), &dir);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "gptq"});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let o = generate_one_token(&dir);
    assert_clean_failure(&o, &["quantization_config"]);
}

/// Text in, text out on a synthetic checkpoint with its own tokenizer.
#[test]
fn prompt_generates_text_with_the_synthetic_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    synth(&model, &["--arch", "qwen3", "--preset", "tiny"]);
    let generate = |extra: &[&str]| {
        let o = run(rabbit()
            .args([
                "generate",
                "--device",
                "cpu",
                "--json",
                "--max-new-tokens",
                "12",
            ])
            .args(["--prompt", "The quick brown fox", "--model"])
            .arg(&model)
            .args(extra));
        assert_ok(&o);
        last_json_line(&o)["sequences"][0].clone()
    };
    let v = generate(&[]);
    let text = v["text"].as_str().expect("text present with a tokenizer");
    assert!(!text.trim().is_empty(), "generated text is empty");
    assert!(v["input_ids"].as_array().unwrap().len() >= 4);
    // Streamed in place: no split was made.
    assert!(!model.join("rabbit-split").exists());
    // With --split, one is made next to the checkpoint on first use, and then used without it
    // (a current split is as fast, and verified): the same text either way.
    let again = |extra: &[&str]| generate(extra)["text"].clone();
    assert_eq!(again(&["--split"]), text);
    assert!(model.join("rabbit-split/manifest.json").exists());
    let o = run(rabbit()
        .args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "1",
            "--input-ids",
            "1",
        ])
        .arg("--model")
        .arg(&model));
    assert_ok(&o);
    assert!(
        !stderr(&o).contains("straight from the checkpoint"),
        "{}",
        stderr(&o)
    );
    assert_eq!(again(&[]), text);
}

/// Every family synth writes generates text through `rabbit generate`, and `rabbit info` without a
/// model lists every family.
#[test]
fn every_family_generates_from_its_synthetic_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(rabbit().args(["info", "--json"]));
    assert_ok(&o);
    let listed = last_json_line(&o);
    let families = listed["families"].as_array().unwrap();
    let synth_archs: Vec<&str> = families
        .iter()
        .filter_map(|f| f["synth_arch"].as_str())
        .collect();
    for arch in [
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma3ForConditionalGeneration",
        "Phi3ForCausalLM",
        "PhiForCausalLM",
        "Glm4ForCausalLM",
        "GlmForCausalLM",
        "Qwen2ForCausalLM",
        "LlamaForCausalLM",
        "ChatGLMModel",
        "InternLM2ForCausalLM",
        "InternLMForCausalLM",
        "BaichuanForCausalLM",
        "QWenLMHeadModel",
    ] {
        assert!(
            families.iter().any(|f| f["architecture"] == arch),
            "{arch} not listed: {listed}"
        );
    }
    for arch in synth_archs {
        let model = tmp.path().join(arch);
        synth(&model, &["--arch", arch, "--preset", "tiny"]);
        let o = run(rabbit()
            .args([
                "generate",
                "--device",
                "cpu",
                "--json",
                "--max-new-tokens",
                "8",
                "--prompt",
                "The quick brown fox",
            ])
            .arg("--model")
            .arg(&model));
        assert_ok(&o);
        let v = last_json_line(&o);
        let s = &v["sequences"][0];
        assert_eq!(s["output_ids"].as_array().unwrap().len(), 8, "{arch}: {v}");
        assert!(
            !s["text"].as_str().unwrap().trim().is_empty(),
            "{arch}: empty text"
        );
    }
    let o = run(rabbit().args(["info"]));
    assert_ok(&o);
    assert!(stdout(&o).contains("Gemma2ForCausalLM"), "{}", stdout(&o));
}

/// `--no-split`: the same tokens as the split, a note saying no split is used, nothing written
/// next to the checkpoint; with an option that needs a split, a clean failure naming both flags.
#[test]
fn no_split_generates_the_same_tokens_and_writes_nothing() {
    let exp = expected("qwen2_tied_f32");
    let seq = &exp["sequences"][0];
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&fixture("qwen2_tied_f32"), &model);
    let files = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = files(&model);
    let gen = |extra: &[&str]| {
        run(rabbit()
            .args(["generate", "--device", "cpu", "--dtype", "f32", "--json"])
            .args(["--max-new-tokens", "8", "--resident-layers", "0"])
            .args(["--input-ids", &ids_csv(&seq["input_ids"])])
            .arg("--model")
            .arg(&model)
            .args(extra))
    };
    let o = gen(&["--no-split"]);
    assert_ok(&o);
    let want: Vec<Value> = seq["greedy_output_ids"].as_array().unwrap()[..8].to_vec();
    assert_eq!(
        last_json_line(&o)["sequences"][0]["output_ids"],
        Value::Array(want)
    );
    assert_eq!(
        files(&model),
        before,
        "nothing written next to the checkpoint"
    );
    for (flag, value) in [
        ("--compression", Some("4bit")),
        ("--delete-original", None),
        ("--verify-split", None),
        ("--split-dir", Some("/tmp/nowhere")),
    ] {
        let mut extra = vec!["--no-split", flag];
        extra.extend(value);
        let o = gen(&extra);
        assert_clean_failure(&o, &["--no-split", flag]);
    }
    assert_eq!(files(&model), before);
}
