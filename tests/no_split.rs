//! Streaming straight from the checkpoint (`--no-split`): the same tokens and logits as the
//! split (bit for bit on a quiet machine; see [`same_run`]) on every fixture and every residency
//! setting; nothing written anywhere; a split that
//! would not fit falls back to it; a shard changed or cut short under a running model is an
//! error naming it; options that need a split are refused by name.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use rabbitllm::{
    AutoModel, DType, DeviceSpec, LoadEvent, LoadOptions, Model, SamplingParams, SplitPolicy,
};

/// Every fixture directory (and the `.bin` copies, next to their config).
fn fixture_dirs(tmp: &Path) -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    let mut names: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| root.join(n).join("expected.json").is_file())
        .collect();
    names.sort();
    for n in names {
        let dir = root.join(&n);
        if dir.join("bin").is_dir() {
            // The PyTorch copy: the fixture's non-weight files plus the .bin weights.
            let copy = tmp.join(format!("{n}-bin"));
            fs::create_dir_all(&copy).unwrap();
            for e in fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if p.is_file() && !name.ends_with(".safetensors") && !name.ends_with(".index.json")
                {
                    fs::copy(&p, copy.join(&name)).unwrap();
                }
            }
            for e in fs::read_dir(dir.join("bin")).unwrap() {
                let p = e.unwrap().path();
                fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
            }
            out.push((format!("{n} (.bin)"), copy));
        }
        out.push((n, dir));
    }
    out
}

fn first_prompt(dir: &Path) -> Vec<u32> {
    let e: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    e["sequences"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn load(dir: &Path, opts: LoadOptions) -> Model {
    AutoModel::from_pretrained(dir.to_str().unwrap(), opts.device(DeviceSpec::Cpu))
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// The same tokens, and logits within 1e-5 of each other. On a quiet machine they are bit for
/// bit the same; under load, on some CPUs (seen on an AMD EPYC, 2 cores, with one busy), MKL's
/// f32 matrix-vector products of tensors at the checkpoint's own alignments round their last
/// bits differently from those at the split's (diffs of 1e-6 to 5e-6 in decode steps only; bf16
/// and prompt logits stayed identical). A split-vs-split rerun under the same load stays
/// identical, so the bound is about where the bytes sit, not what they are.
fn same_run(
    got: &(Vec<u32>, Vec<f32>, Vec<f32>),
    want: &(Vec<u32>, Vec<f32>, Vec<f32>),
    what: &str,
) {
    assert_eq!(got.0, want.0, "{what}: tokens");
    for (name, a, b) in [("decode", &got.1, &want.1), ("prompt", &got.2, &want.2)] {
        assert_eq!(a.len(), b.len(), "{what}: {name} logits");
        let d = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            d <= 1e-5 && a.iter().all(|v| v.is_finite()),
            "{what}: {name} logits differ by {d}"
        );
    }
}

/// Tokens and every step's logits of a short greedy run, plus the prompt's logits.
fn run(model: &mut Model, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let out = greedy(
        model,
        vec![prompt.to_vec()],
        steps,
        SamplingParams::default(),
    );
    let prefill = model.engine.prompt_logits(prompt).unwrap();
    let s = &out.sequences[0];
    (s.output_ids.clone(), s.logits.clone().unwrap(), prefill)
}

#[test]
fn every_fixture_gives_the_same_logits_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, dir) in fixture_dirs(tmp.path()) {
        let prompt = first_prompt(&dir);
        // The checkpoint's own dtype (bf16 fixtures compute in bf16), every layer streamed.
        let base = || LoadOptions::default().resident_layers(0);
        let split = tmp.path().join(format!("split-{}", name.replace(' ', "_")));
        let mut a = load(&dir, base().split_dir(&split));
        let want = run(&mut a, &prompt, 4);
        drop(a);
        let mut b = load(&dir, base().no_split(true));
        assert!(b.engine.streams_in_place(), "{name}");
        assert_eq!(b.engine.source_dir(), dir.as_path());
        let got = run(&mut b, &prompt, 4);
        same_run(&got, &want, &name);
    }
}

/// Options applied on top of the base ones.
type Setting = Box<dyn Fn(LoadOptions) -> LoadOptions>;

/// Every residency setting and read mode, on an untied and a tied model, a sharded bf16 one and
/// InternLM2 (whose packed `wqkv` the split regroups on disk, and in place after each read).
#[test]
fn every_residency_setting_gives_the_same_logits_in_place() {
    for name in [
        "qwen2_untied_f32",
        "qwen2_tied_f32",
        "qwen2_bf16_sharded",
        "internlm2",
    ] {
        let case = Case::load(name);
        let (prompt, _) = case.sequences().remove(0);
        let split = tempfile::tempdir().unwrap();
        let tight = tight_budget(&case.dir);
        let settings: Vec<(&str, Setting)> = vec![
            ("all streamed", Box::new(|o| o.resident_layers(0))),
            (
                "all streamed, O_DIRECT",
                Box::new(|o| o.resident_layers(0).direct_io(true)),
            ),
            ("one resident", Box::new(|o| o.resident_layers(1))),
            ("all resident", Box::new(|o| o.resident_layers(99))),
            ("default plan", Box::new(|o| o)),
            (
                "embedding and LM head off the device",
                Box::new(move |o| o.device_memory_budget(tight)),
            ),
        ];
        for (what, set) in &settings {
            let base = || set(LoadOptions::default().dtype(DType::F32));
            let mut a = load(&case.dir, base().split_dir(split.path()));
            let want = run(&mut a, &prompt, 3);
            let plan_a = a.engine.plan().clone();
            drop(a);
            let mut b = load(&case.dir, base().no_split(true));
            assert_eq!(
                b.engine.plan().resident_layers,
                plan_a.resident_layers,
                "{name} {what}: same plan"
            );
            assert_eq!(b.engine.plan().embedding_on_host, plan_a.embedding_on_host);
            if what.contains("off the device") {
                assert!(plan_a.embedding_on_host, "{name}: {plan_a:?}");
            }
            let got = run(&mut b, &prompt, 3);
            same_run(&got, &want, &format!("{name} {what}"));
        }
    }
}

/// A device budget with room for about half the embedding matrix (f32) besides the KV cache and
/// activations: the embedding and LM head are used from the files.
fn tight_budget(dir: &Path) -> u64 {
    let split = tempfile::tempdir().unwrap();
    let m = load(
        dir,
        LoadOptions::default()
            .dtype(DType::F32)
            .split_dir(split.path()),
    );
    let p = m.engine.plan().clone();
    let spec = m.engine.spec();
    let matrix = (spec.vocab_size * spec.hidden_size * 4) as u64;
    p.kv_bytes + p.activation_bytes + (spec.hidden_size * 4) as u64 + matrix / 2
}

/// Every file under `dir` with its size and modification time (and every directory).
type Tree = BTreeMap<PathBuf, Option<(u64, std::time::SystemTime)>>;

fn tree(dir: &Path) -> Tree {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                // A directory's own times change when an entry comes and goes: its entries say
                // what matters.
                stack.push(e.path());
                m.insert(e.path(), None);
            } else {
                m.insert(e.path(), Some((md.len(), md.modified().unwrap())));
            }
        }
    }
    m
}

fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dir = to.join(name);
    fs::create_dir_all(&dir).unwrap();
    for e in fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn nothing_is_written_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("qwen2_bf16_sharded", tmp.path());
    let before = tree(tmp.path());
    let mut m = load(
        &dir,
        LoadOptions::default().resident_layers(1).no_split(true),
    );
    let _ = run(&mut m, &first_prompt(&dir), 2);
    drop(m);
    assert_eq!(
        tree(tmp.path()),
        before,
        "the checkpoint's directory changed"
    );
}

/// A disk too small for the split: the model streams in place instead, says so with the numbers,
/// and leaves no empty split directory behind. Compression needs the split: its error stands.
#[test]
fn a_split_that_does_not_fit_streams_in_place_instead() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("qwen2_untied_f32", tmp.path());
    let before = tree(tmp.path());
    let prompt = first_prompt(&dir);
    rabbitllm::split::testing::override_available_space(Some(1000));
    let mut events = Vec::new();
    let loaded = AutoModel::from_pretrained_with_progress(
        dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::F32)
            .resident_layers(0)
            .split_policy(SplitPolicy::Always),
        &mut |e| events.push(e.clone()),
    );
    let compressed = AutoModel::from_pretrained(
        dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .compression(Some(rabbitllm::split::Compression::Nf4)),
    );
    rabbitllm::split::testing::override_available_space(None);
    let mut m = loaded.unwrap();
    assert!(m.engine.streams_in_place());
    let reason = events
        .iter()
        .find_map(|e| match e {
            LoadEvent::InPlace { reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("an InPlace event");
    assert!(
        reason.contains("1000 bytes") && reason.contains("rabbit-split"),
        "{reason}"
    );
    let err = compressed
        .err()
        .expect("compression needs the split")
        .to_string();
    assert!(err.contains("not enough disk space"), "{err}");
    assert_eq!(tree(tmp.path()), before, "nothing left behind");
    // And it computes what the split computes.
    let got = run(&mut m, &prompt, 3);
    drop(m);
    let split = tempfile::tempdir().unwrap();
    let mut s = load(
        &dir,
        LoadOptions::default()
            .dtype(DType::F32)
            .resident_layers(0)
            .split_dir(split.path()),
    );
    assert!(run(&mut s, &prompt, 3) == got);
}

fn err_of(dir: &Path, opts: LoadOptions) -> String {
    match AutoModel::from_pretrained(dir.to_str().unwrap(), opts.device(DeviceSpec::Cpu)) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn options_that_need_a_split_are_refused_by_name() {
    let dir = fixture("qwen2_tied_f32");
    let no = || LoadOptions::default().no_split(true);
    for (opts, flag) in [
        (
            no().compression(Some(rabbitllm::split::Compression::Int8)),
            "--compression",
        ),
        (no().delete_original(true), "--delete-original"),
        (no().split_dir("/tmp/x"), "--split-dir"),
        (no().verify_split(true), "--verify-split"),
    ] {
        let e = err_of(&dir, opts);
        assert!(e.contains("--no-split") && e.contains(flag), "{e}");
    }
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // Cut short before opening.
    let dir = copy_fixture("qwen2_untied_f32", tmp.path());
    let w = dir.join("model.safetensors");
    let len = fs::metadata(&w).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = err_of(&dir, LoadOptions::default().no_split(true));
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A tensor whose shape does not match the config.
    let dir = copy_fixture("qwen2_tied_f32", tmp.path());
    let cfg = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg).unwrap()).unwrap();
    let inter = c["intermediate_size"].as_u64().unwrap();
    c["intermediate_size"] = (inter + 8).into();
    fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
    let e = err_of(&dir, LoadOptions::default().no_split(true));
    assert!(e.contains("mlp") && e.contains("model.safetensors"), "{e}");
}

/// A shard modified in place, or cut short, while the model runs: the next read of it is an
/// error naming it, for every read mode (a shard cut short under a mapping can only be caught
/// before the mapping, so that case runs with buffered reads).
#[test]
fn a_shard_changed_under_a_running_model_is_an_error_naming_it() {
    for (direct, cut) in [(false, false), (true, false), (true, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_fixture("qwen2_untied_f32", tmp.path());
        let prompt = first_prompt(&dir);
        let mut m = load(
            &dir,
            LoadOptions::default()
                .dtype(DType::F32)
                .resident_layers(0)
                .direct_io(direct)
                .no_split(true),
        );
        let _ = run(&mut m, &prompt, 1);
        let w = dir.join("model.safetensors");
        let f = fs::OpenOptions::new().write(true).open(&w).unwrap();
        let len = f.metadata().unwrap().len();
        if cut {
            f.set_len(len / 2).unwrap();
        } else {
            // Same size, new bytes at the end (the last tensor's) and a new modification time.
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0x7f; 4], len - 4).unwrap();
            f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
                .unwrap();
        }
        drop(f);
        let req = rabbitllm::GenerateRequest {
            sequences: vec![prompt.clone()],
            max_new_tokens: 3,
            ..Default::default()
        };
        let e = m
            .generate(&req, &mut |_| rabbitllm::Control::Continue)
            .err()
            .unwrap_or_else(|| panic!("direct {direct} cut {cut}: a changed shard went unnoticed"))
            .to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        // Cut short: "shorter" when the next read lies past the new end, "changed" when it
        // still fits (the size differs either way).
        let changed = e.contains("changed while the model was running");
        let shorter = e.contains("shorter than its header");
        assert!(
            changed || (cut && shorter),
            "direct {direct} cut {cut}: {e}"
        );
    }
}

/// A safetensors file whose header length is not a multiple of 8 (old writers) puts every tensor
/// off its natural alignment: streamed in place the tensors are copied rather than viewed, with
/// the same results; used from the file (the embedding on the host) it is refused clearly.
#[test]
fn a_misaligned_safetensors_file_is_copied_not_viewed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("qwen2_untied_f32", tmp.path());
    let w = dir.join("model.safetensors");
    let bytes = fs::read(&w).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut out = ((n + 1) as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&bytes[8..8 + n]);
    out.push(b' ');
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(&w, out).unwrap();
    let prompt = first_prompt(&dir);
    let split = tempfile::tempdir().unwrap();
    for resident in [0, 99] {
        let base = || {
            LoadOptions::default()
                .dtype(DType::F32)
                .resident_layers(resident)
        };
        let mut a = load(&dir, base().split_dir(split.path()));
        let want = run(&mut a, &prompt, 2);
        drop(a);
        let mut b = load(&dir, base().no_split(true));
        same_run(
            &run(&mut b, &prompt, 2),
            &want,
            &format!("resident {resident}"),
        );
    }
    // By default such a checkpoint is split (viewing it in place would copy every sweep).
    let m = load(&dir, LoadOptions::default().split_policy(SplitPolicy::Auto));
    assert!(!m.engine.streams_in_place());
    drop(m);
    let tight = tight_budget(&dir);
    let e = err_of(
        &dir,
        LoadOptions::default()
            .dtype(DType::F32)
            .device_memory_budget(tight)
            .no_split(true),
    );
    assert!(
        e.contains("not aligned") && e.contains("embed_tokens"),
        "{e}"
    );
}

/// Every family `rabbit synth` writes, in three shards (so units straddle files) and in f32 and
/// bf16: in place equals the split ([`same_run`]), streamed and with the default plan.
#[test]
fn every_family_in_shards_gives_the_same_logits_in_place() {
    use rabbitllm::models::synth::{synthesize, SynthDtype, SynthOptions};
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for f in rabbitllm::models::families() {
        if !f.can_synth() {
            continue;
        }
        for (dtype, d) in [(SynthDtype::F32, "f32"), (SynthDtype::BF16, "bf16")] {
            let dir = tmp.path().join(format!("{}-{d}", f.key()));
            let mut o = SynthOptions::new(f.key(), "tiny", &dir);
            o.shards = 3;
            o.dtype = dtype;
            o.seed = 11;
            synthesize(&o, &mut |_| {}).unwrap();
            let split = tmp.path().join(format!("{}-{d}-split", f.key()));
            let prompt: Vec<u32> = (1..=9).collect();
            for resident in [Some(0), None] {
                let base = || {
                    let o = LoadOptions::default();
                    match resident {
                        Some(n) => o.resident_layers(n),
                        None => o,
                    }
                };
                let mut a = load(&dir, base().split_dir(&split));
                let want = run(&mut a, &prompt, 3);
                drop(a);
                let mut b = load(&dir, base().no_split(true));
                let got = run(&mut b, &prompt, 3);
                let what = format!("{} {d} resident {resident:?}", f.key());
                same_run(&got, &want, &what);
            }
            seen += 1;
        }
    }
    assert!(seen >= 20, "only {seen} families synthesised");
}

/// By default a checkpoint whose tensors are packed in another row order (InternLM2's `wqkv`) is
/// split: in place, every streamed layer would regroup the rows again (measured 1.5× slower,
/// docs/BENCHMARKS.md). `--verify-split` asks for a split to check: no fallback when it does not
/// fit.
#[test]
fn row_ordered_checkpoints_are_split_and_verify_split_needs_its_split() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("internlm2", tmp.path());
    let m = load(&dir, LoadOptions::default().dtype(DType::F32));
    assert!(!m.engine.streams_in_place());
    assert!(dir.join("rabbit-split/manifest.json").exists());
    drop(m);
    let dir = copy_fixture("qwen2_tied_f32", tmp.path());
    rabbitllm::split::testing::override_available_space(Some(1000));
    let e = AutoModel::from_pretrained(
        dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .verify_split(true),
    )
    .err()
    .map(|e| e.to_string());
    rabbitllm::split::testing::override_available_space(None);
    let e = e.expect("no fallback with --verify-split");
    assert!(e.contains("not enough disk space"), "{e}");
    assert!(!dir.join("rabbit-split").exists(), "nothing left behind");
}

/// The byte ranges come from the headers read when planning: a shard replaced (a new file under
/// the same name, as a re-download writes it) before the engine opens is refused, naming it.
#[test]
fn a_shard_replaced_between_planning_and_opening_is_refused() {
    use rabbitllm::core::engine::{Engine, EngineOptions};
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("qwen2_bf16_sharded", tmp.path());
    let spec = rabbitllm::models::load_spec(&dir).unwrap();
    let plan = rabbitllm::split::plan_in_place(&dir, &spec.layout()).unwrap();
    let victim = dir.join("model-00003-of-00007.safetensors");
    let bytes = fs::read(&victim).unwrap();
    fs::remove_file(&victim).unwrap();
    fs::write(&victim, &bytes).unwrap();
    let opts = EngineOptions::new(DeviceSpec::Cpu.resolve().unwrap(), DType::F32);
    let e = Engine::open_planned_in_place(&plan, spec.clone(), &opts)
        .err()
        .expect("a replaced shard")
        .to_string();
    assert!(
        e.contains("model-00003-of-00007.safetensors") && e.contains("changed"),
        "{e}"
    );
    // Planned again, it opens.
    let plan = rabbitllm::split::plan_in_place(&dir, &spec.layout()).unwrap();
    assert!(Engine::open_planned_in_place(&plan, spec, &opts).is_ok());
}

/// A split of the same weights at the default place is used (and repaired when damaged); after
/// the checkpoint changes, the old split is left alone and the model streams in place, unless
/// `--split` asks to redo it.
#[test]
fn an_existing_split_is_used_while_it_matches_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("qwen2_untied_f32", tmp.path());
    let opts = || LoadOptions::default().dtype(DType::F32);
    drop(load(&dir, opts().split_policy(SplitPolicy::Always)));
    let manifest = dir.join("rabbit-split/manifest.json");
    let made = fs::read(&manifest).unwrap();
    let m = load(&dir, opts());
    assert!(!m.engine.streams_in_place(), "the split is used");
    drop(m);
    // The weights change (a new modification time is enough for the fingerprint).
    let w = dir.join("model.safetensors");
    let f = fs::OpenOptions::new().write(true).open(&w).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10))
        .unwrap();
    drop(f);
    let m = load(&dir, opts());
    assert!(m.engine.streams_in_place(), "a stale split is not redone");
    drop(m);
    assert_eq!(fs::read(&manifest).unwrap(), made, "and left alone");
    let m = load(&dir, opts().split_policy(SplitPolicy::Always));
    assert!(!m.engine.streams_in_place());
    assert_ne!(fs::read(&manifest).unwrap(), made, "--split redoes it");
}
