//! End-to-end tests of the `rabbit` binary: linkage, the generate contract (JSON, logits dump),
//! split/verify, and clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn rabbit() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rabbit"));
    c.env_remove("LD_LIBRARY_PATH").env("RUST_LOG", "warn");
    c
}

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("rabbit runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn last_json_line(o: &Output) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no stdout; stderr: {}", stderr(o)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

fn expected(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(case).join("expected.json")).unwrap())
        .unwrap()
}

fn ids_csv(v: &Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A failing command: non-zero exit, a message containing `needle`, and never a panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention `{needle}`: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
}

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
    assert!(o.status.success(), "{}", stderr(&o));
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
    assert!(o.status.success(), "{}", stderr(&o));
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
    assert!(o.status.success(), "{}", stderr(&o));
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
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(rabbit().args(["split", "--verify"]).arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    // Second run reuses.
    let o = run(rabbit()
        .args(["split", "--model"])
        .arg(fixture("qwen2_untied_f32"))
        .arg("--out")
        .arg(&out));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("reused"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Flip one byte of a layer's data.
    let victim = out.join("layer.001.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    let o = run(rabbit().args(["split", "--verify"]).arg(&out));
    assert_clean_failure(&o, "layer.001.safetensors");
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

fn generate_fixture(extra: &[&str], split: &Path) -> Output {
    let device: &[&str] = if extra.contains(&"--device") {
        &[]
    } else {
        &["--device", "cpu"]
    };
    run(rabbit()
        .arg("generate")
        .args(device)
        .arg("--model")
        .arg(fixture("qwen2_tied_f32"))
        .arg("--split-dir")
        .arg(split)
        .args(extra))
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
    assert_clean_failure(&o, "--input-ids");
    // Token id beyond the vocabulary.
    let o = generate_fixture(
        &["--max-new-tokens", "2", "--input-ids", "1,999999"],
        &split,
    );
    assert_clean_failure(&o, "token id 999999 is out of range");
    // Prompt with no tokenizer.
    let o = generate_fixture(&["--max-new-tokens", "2", "--prompt", "hello"], &split);
    assert_clean_failure(&o, "tokenizer");
    // Prompt longer than the context (max_position_embeddings 512).
    let long = vec!["1"; 600].join(",");
    let o = generate_fixture(&["--max-new-tokens", "2", "--input-ids", &long], &split);
    assert_clean_failure(&o, "max_position_embeddings 512");
    // Unknown dtype and device.
    let o = generate_fixture(
        &["--max-new-tokens", "2", "--input-ids", "1", "--dtype", "f8"],
        &split,
    );
    assert_clean_failure(&o, "unknown dtype `f8`");
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
    assert_clean_failure(&o, "unknown device `tpu`");
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
        assert_clean_failure(&o, "CUDA is not available");
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
    assert_clean_failure(&o, "/nonexistent/model");

    // Unknown and not-yet-supported architectures.
    for (arch, needle) in [
        ("FancyNetForCausalLM", "unknown architecture"),
        ("MixtralForCausalLM", "not yet supported"),
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
        assert_clean_failure(&o, needle);
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
    assert_clean_failure(&o, "quantization_config");
}

fn synth(dir: &Path, layers: usize) {
    let o = run(rabbit()
        .args([
            "synth", "--arch", "qwen2", "--preset", "tiny", "--dtype", "f32", "--hidden", "512",
        ])
        .args([
            "--intermediate",
            "2048",
            "--heads",
            "8",
            "--kv-heads",
            "8",
            "--seed",
            "3",
            "--layers",
        ])
        .arg(layers.to_string())
        .arg("--out")
        .arg(dir));
    assert!(o.status.success(), "{}", stderr(&o));
}

fn layer_bytes(split: &Path) -> u64 {
    std::fs::read_dir(split)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("layer.")
        })
        .map(|p| p.metadata().unwrap().len())
        .sum()
}

/// The streaming proof: same width, 4 vs 32 layers. The split grows 8x, the peak RSS of a whole
/// generate run does not (within +20%), because only a few layers are ever in memory.
#[test]
fn peak_memory_does_not_grow_with_the_number_of_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    let mut sizes = Vec::new();
    for layers in [4usize, 32] {
        let model = tmp.path().join(format!("m{layers}"));
        let split = tmp.path().join(format!("s{layers}"));
        synth(&model, layers);
        let o = run(rabbit()
            .args([
                "generate",
                "--device",
                "cpu",
                "--json",
                "--max-new-tokens",
                "4",
                "--input-ids",
                "1,2,3,4,5",
            ])
            .args(["--resident-layers", "0"])
            .arg("--model")
            .arg(&model)
            .arg("--split-dir")
            .arg(&split));
        assert!(o.status.success(), "{}", stderr(&o));
        let v = last_json_line(&o);
        assert_eq!(v["sequences"][0]["output_ids"].as_array().unwrap().len(), 4);
        assert!(
            v["memory"]["staging_bytes"].as_u64().unwrap() > 0,
            "every layer streams"
        );
        peaks.push(v["memory"]["peak_rss_bytes"].as_u64().unwrap());
        sizes.push(layer_bytes(&split));
    }
    let growth = sizes[1] as f64 / sizes[0] as f64;
    assert!(
        (7.9..8.1).contains(&growth),
        "layer files grew {growth}x, expected 8x"
    );
    // The process baseline (libtorch, CUDA libraries, allocator) differs between machines, so
    // compare growth: 28 more layers streamed must add far less than those layers' bytes (the
    // reader holds a few layers at a time, whatever the count).
    let grown = peaks[1].saturating_sub(peaks[0]);
    let added = sizes[1] - sizes[0];
    assert!(
        grown < added / 4,
        "peak RSS grew by {grown} bytes ({} -> {}) while the layers grew by {added} bytes ({} -> {}): \
         memory follows the model size",
        peaks[0],
        peaks[1],
        sizes[0],
        sizes[1]
    );
}

/// Text in, text out on a synthetic checkpoint with its own tokenizer.
#[test]
fn prompt_generates_text_with_the_synthetic_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let o = run(rabbit()
        .args(["synth", "--arch", "qwen3", "--preset", "tiny", "--out"])
        .arg(&model));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(rabbit()
        .args([
            "generate",
            "--device",
            "cpu",
            "--json",
            "--max-new-tokens",
            "12",
            "--prompt",
            "The quick brown fox",
        ])
        .arg("--model")
        .arg(&model));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = last_json_line(&o);
    let text = v["sequences"][0]["text"]
        .as_str()
        .expect("text present with a tokenizer");
    assert!(!text.trim().is_empty(), "generated text is empty");
    assert!(v["sequences"][0]["input_ids"].as_array().unwrap().len() >= 4);
    // The split was made next to the checkpoint on first use, and is reused the second time.
    assert!(model.join("rabbit-split/manifest.json").exists());
}

#[test]
fn bench_reports_the_contract_fields_and_streamed_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let split = tmp.path().join("split");
    for extra in [
        &["--resident-layers", "0"][..],
        &["--resident-layers", "0", "--cold"][..],
    ] {
        let o = run(rabbit()
            .args([
                "bench",
                "--device",
                "cpu",
                "--json",
                "--new-tokens",
                "4",
                "--repeat",
                "2",
                "--prompt-len",
                "8",
            ])
            .arg("--model")
            .arg(fixture("qwen2_untied_f32"))
            .arg("--split-dir")
            .arg(&split)
            .args(extra));
        assert!(o.status.success(), "{}", stderr(&o));
        let v = last_json_line(&o);
        for k in [
            "decode_s_per_token",
            "prefill_tokens_per_s",
            "read_bytes_per_s",
            "io_floor_s_per_token",
        ] {
            assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
        }
        assert!(v["peak_memory_bytes"].as_u64().unwrap() > 0);
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(split.join("manifest.json")).unwrap())
                .unwrap();
        let layer_bytes: u64 = manifest["units"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["kind"] == "layer")
            .map(|u| u["data_len"].as_u64().unwrap())
            .sum();
        assert_eq!(
            v["bytes_streamed_per_token"].as_u64().unwrap(),
            layer_bytes,
            "every layer streams once per token"
        );
        assert_eq!(v["streamed_layers"], 3);
        assert!(
            v["compute_s_per_token"].as_f64().is_some(),
            "resident baseline measured"
        );
    }
}

#[test]
fn bench_takes_prompt_ids_from_a_file_and_reports_its_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let split = tmp.path().join("split");
    let ids = tmp.path().join("ids.txt");
    std::fs::write(&ids, "# two sequences\n1,2,3,4,5\n6 7 8 9 10\n").unwrap();
    let o = run(rabbit()
        .args(["bench", "--device", "cpu", "--json", "--no-baseline"])
        .args(["--new-tokens", "3", "--repeat", "1", "--model"])
        .arg(fixture("qwen2_tied_f32"))
        .arg("--split-dir")
        .arg(&split)
        .arg("--prompt-ids-file")
        .arg(&ids));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = last_json_line(&o);
    assert_eq!(v["config"]["batch"], 2, "the file sets the batch: {v}");
    assert_eq!(
        v["config"]["prompt_ids"][1],
        serde_json::json!([6, 7, 8, 9, 10])
    );
    assert!(v["load_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert!(v["prefill_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    let out = v["output_ids"].as_array().expect("output_ids");
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|s| s.as_array().unwrap().len() == 3));
    // The same greedy tokens as `rabbit generate` on that prompt (which may stop at EOS earlier).
    let o = generate_fixture(
        &[
            "--max-new-tokens",
            "3",
            "--input-ids",
            "1,2,3,4,5",
            "--json",
        ],
        &split,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = last_json_line(&o)["sequences"][0]["output_ids"].clone();
    let g = g.as_array().unwrap();
    assert_eq!(&out[0].as_array().unwrap()[..g.len()], &g[..]);
    // The file decides batch and prompt length: the flags that would contradict it are refused.
    let o = run(rabbit()
        .args(["bench", "--device", "cpu", "--batch", "2", "--model"])
        .arg(fixture("qwen2_tied_f32"))
        .arg("--prompt-ids-file")
        .arg(&ids));
    assert_clean_failure(&o, "cannot be used with");
    std::fs::write(&ids, "1,x\n").unwrap();
    let o = run(rabbit()
        .args(["bench", "--device", "cpu", "--model"])
        .arg(fixture("qwen2_tied_f32"))
        .arg("--split-dir")
        .arg(&split)
        .arg("--prompt-ids-file")
        .arg(&ids));
    assert_clean_failure(&o, "--prompt-ids-file");
}

#[test]
fn info_shows_the_plan_and_budgets_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let split = tmp.path().join("split");
    let o = run(rabbit()
        .args([
            "info",
            "--device",
            "cpu",
            "--json",
            "--resident-layers",
            "1",
            "--model",
        ])
        .arg(fixture("qwen2_untied_f32"))
        .arg("--split-dir")
        .arg(&split));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = last_json_line(&o);
    assert_eq!(v["plan"]["resident_layers"], serde_json::json!([0]));
    assert_eq!(v["plan"]["streamed_layers"], serde_json::json!([1, 2]));
    assert!(v["read_bytes_per_s"].as_f64().unwrap() > 0.0);

    for (budget, needle) in [
        ("12 parsecs", "parsecs"),
        ("1KiB", "not even one token of context fits"),
        // The embedding and LM head leave the device first, then the context is what is left.
        ("1MiB", "LM head streamed in chunks"),
        ("1MiB", "largest context that fits is about 250 tokens"),
    ] {
        let o = run(rabbit()
            .args([
                "info",
                "--device",
                "cpu",
                "--device-memory-budget",
                budget,
                "--model",
            ])
            .arg(fixture("qwen2_untied_f32"))
            .arg("--split-dir")
            .arg(&split));
        assert_clean_failure(&o, needle);
    }
}

#[test]
fn generate_profile_names_the_bottleneck() {
    let tmp = tempfile::tempdir().unwrap();
    let prof = tmp.path().join("profile.json");
    let o = generate_fixture(
        &[
            "--max-new-tokens",
            "3",
            "--input-ids",
            "1,2,3",
            "--resident-layers",
            "1",
            "--profile",
            "--profile-json",
            prof.to_str().unwrap(),
        ],
        &tmp.path().join("split"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("bottleneck:"), "{}", stderr(&o));
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&prof).unwrap()).unwrap();
    let layers = p["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["resident"], true);
    assert_eq!(layers[1]["resident"], false);
    assert!(layers[1]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(layers[0]["bytes"], 0);
}

/// A real tokenizer from the shared data directory beside the checkout (skips when absent).
fn shared_tokenizer(name: &str) -> Option<PathBuf> {
    rabbit_models::testdata::shared_tokenizer(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tokenizers"),
        name,
    )
}

/// `rabbit template` prints exactly what transformers' apply_chat_template gives, nothing else.
#[test]
fn template_prints_exactly_the_transformers_rendering() {
    let goldens: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../rabbit-models/tests/fixtures/chat/goldens.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (Some(qwen2), Some(qwen3)) = (shared_tokenizer("qwen2"), shared_tokenizer("qwen3")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (tok, dir) in [("qwen2", &qwen2), ("qwen3", &qwen3)] {
        for case in goldens["tokenizers"][tok]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .take(6)
        {
            let file = tmp.path().join("messages.json");
            std::fs::write(&file, case["messages"].to_string()).unwrap();
            let mut cmd = rabbit();
            cmd.args(["template", "--model"])
                .arg(dir)
                .arg("--messages")
                .arg(&file);
            if case["add_generation_prompt"] == false {
                cmd.arg("--no-generation-prompt");
            }
            let o = run(&mut cmd);
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(
                String::from_utf8(o.stdout).unwrap(),
                case["expected"].as_str().unwrap(),
                "{tok} {}",
                case["name"]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"[{"role": "user"}]"#).unwrap();
    let o = run(rabbit()
        .args(["template", "--model"])
        .arg(&qwen2)
        .arg("--messages")
        .arg(&bad));
    assert_clean_failure(&o, "bad.json");
}

fn tiny_chat_model(dir: &Path) {
    let o = run(rabbit()
        .args([
            "synth", "--arch", "qwen2", "--preset", "tiny", "--seed", "5", "--out",
        ])
        .arg(dir));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn generate_chat_applies_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_chat_model(&model);
    let o = run(rabbit()
        .args([
            "generate",
            "--device",
            "cpu",
            "--json",
            "--max-new-tokens",
            "4",
            "--chat",
            "--system",
            "Be brief.",
        ])
        .args(["--prompt", "Hello <|im_end|> there"])
        .arg("--model")
        .arg(&model));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = last_json_line(&o);
    let ids: Vec<u64> = v["sequences"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    let im_end = cfg["eos_token_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .max()
        .unwrap();
    let im_start = im_end - 1;
    assert_eq!(ids[0], im_start, "starts with <|im_start|>: {ids:?}");
    // system turn, user turn: exactly two <|im_end|> from the markup; the one the user typed stays text.
    assert_eq!(ids.iter().filter(|&&t| t == im_end).count(), 2, "{ids:?}");
    assert_eq!(
        ids.iter().filter(|&&t| t == im_start).count(),
        3,
        "system, user, assistant opener: {ids:?}"
    );
}

#[test]
fn chat_repl_commands_and_ctrl_c() {
    use std::io::Write as _;
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_chat_model(&model);
    let mut child = rabbit()
        .args([
            "chat",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "100000",
            "--model",
        ])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "Tell me a long story").unwrap();
    stdin.flush().unwrap();
    // Wait until the answer is streaming (its first bytes on stdout), then Ctrl-C it: the
    // answer (up to the 2048-token context) takes seconds, so the signal lands mid-answer.
    let mut out = child.stdout.take().unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::Read as _;
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        let mut told = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !told {
                let _ = first_tx.send(());
                told = true;
            }
        }
        all
    });
    first_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the answer starts streaming");
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    writeln!(stdin, "/system You are terse.").unwrap();
    writeln!(stdin, "/bogus").unwrap();
    writeln!(stdin, "/reset").unwrap();
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let answer = reader.join().unwrap();
    let err = stderr(&o);
    assert!(
        o.status.success(),
        "chat exits cleanly after Ctrl-C and /exit: {err}"
    );
    assert!(
        err.contains("stopped"),
        "Ctrl-C stopped the answer, not the program: {err}"
    );
    assert!(err.contains("tok/s"), "per-answer speed shown: {err}");
    assert!(err.contains("system prompt set"), "{err}");
    assert!(err.contains("unknown command `/bogus`"), "{err}");
    assert!(err.contains("conversation reset"), "{err}");
    assert!(
        !String::from_utf8_lossy(&answer).trim().is_empty(),
        "the answer was printed"
    );
}
