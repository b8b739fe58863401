//! Tests of `rabbit_models::synth`: presets, the files of a synthetic checkpoint, determinism,
//! reuse, the tokenizer, bounded memory while streaming, and that the tiny model's weights give a
//! non-degenerate greedy decode (checked with a small f32 reference forward pass written here).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rabbit_models::synth::{
    self, plan, presets, synthesize, SynthDtype, SynthError, SynthOptions, SynthOverrides,
    SynthProgress,
};
use rabbit_models::{load_spec, HfConfig, ModelSpec};
use safetensors::SafeTensors;
use serde_json::Value;

const ARCHES: [&str; 4] = ["qwen2", "qwen3", "llama", "mistral"];

fn opts(arch: &str, preset: &str, dir: &Path) -> SynthOptions {
    SynthOptions::new(arch, preset, dir)
}

fn run(o: &SynthOptions) -> synth::SynthReport {
    synthesize(o, &mut |_| {}).unwrap_or_else(|e| panic!("synthesize {o:?}: {e}"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Every tensor of every weight file: name -> (file, dtype, shape).
fn read_tensors(dir: &Path) -> BTreeMap<String, (String, safetensors::Dtype, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let bytes = fs::read(dir.join(&name)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (t, view) in st.tensors() {
            let prev = out.insert(
                t.clone(),
                (name.clone(), view.dtype(), view.shape().to_vec()),
            );
            assert!(prev.is_none(), "{t} appears twice");
        }
    }
    out
}

fn assert_tensors_match_spec(dir: &Path, spec: &ModelSpec, dtype: safetensors::Dtype) {
    let got = read_tensors(dir);
    let want = spec.tensor_shapes();
    assert_eq!(got.len(), want.len(), "tensor count in {}", dir.display());
    for (name, shape) in &want {
        let (_, d, s) = got
            .get(name)
            .unwrap_or_else(|| panic!("missing tensor {name}"));
        assert_eq!(s, shape, "{name}");
        assert_eq!(*d, dtype, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Presets and validation

#[test]
fn presets_resolve_with_the_real_parameter_counts() {
    // Published parameter counts of the real models (tied embeddings counted once).
    let cases: &[(&str, &str, u64)] = &[
        ("qwen2", "qwen2.5-0.5b", 494_032_768),
        ("qwen2", "qwen2.5-1.5b", 1_543_714_304),
        ("qwen2", "qwen2.5-3b", 3_085_938_688),
        ("qwen2", "qwen2.5-7b", 7_615_616_512),
        ("qwen3", "qwen3-0.6b", 596_049_920),
        ("qwen3", "qwen3-1.7b", 1_720_574_976),
        ("llama", "llama3.2-1b", 1_235_814_400),
        ("mistral", "mistral-7b", 7_241_732_096),
    ];
    let dir = Path::new("/nonexistent/never-written");
    for &(arch, preset, params) in cases {
        let p = plan(&opts(arch, preset, dir)).unwrap_or_else(|e| panic!("{preset}: {e}"));
        let rel = (p.num_parameters as f64 - params as f64).abs() / params as f64;
        assert!(
            rel < 0.01,
            "{preset}: {} params, expected ~{params}",
            p.num_parameters
        );
        assert_eq!(p.num_parameters, params, "{preset}");
        assert_eq!(p.weight_bytes, params * 2, "{preset}: bf16 bytes");
        assert_eq!(p.spec.num_parameters(), params);
        assert!(p.spec.vocab_size >= p.tokenizer_size);
    }
    assert!(!dir.exists());

    let q3 = plan(&opts("qwen3", "qwen3-0.6b", dir)).unwrap();
    assert_eq!(q3.spec.head_dim, 128);
    assert!(q3.spec.qk_norm && q3.spec.tie_word_embeddings);
    assert_eq!(q3.config_json["head_dim"], 128);
    assert_eq!(q3.config_json["max_position_embeddings"], 40960);
    assert_eq!(q3.config_json["sliding_window"], Value::Null);
    assert_eq!(q3.config_json["use_sliding_window"], false);

    let q7 = plan(&opts("Qwen2ForCausalLM", "qwen2.5-7b", dir)).unwrap();
    assert!(!q7.spec.tie_word_embeddings && q7.spec.qkv_bias);
    assert_eq!(q7.spec.vocab_size, 152_064);
    assert_eq!(q7.spec.tensor_shapes().last().unwrap().0, "lm_head.weight");

    let l = plan(&opts("llama", "llama3.2-1b", dir)).unwrap();
    assert_eq!(l.config_json["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(l.config_json["rope_scaling"]["factor"], 32.0);
    assert_eq!(l.config_json["rope_theta"], 500_000.0);
    assert_eq!(l.config_json["rms_norm_eps"], 1e-5);
    assert!(matches!(
        l.spec.rope.scaling,
        rabbit_models::RopeScaling::Llama3 { .. }
    ));

    let m = plan(&opts("mistral", "mistral-7b", dir)).unwrap();
    assert_eq!(m.spec.sliding_windows, vec![None; 32]);
    assert_eq!(m.spec.rope.theta, 1e6);
    assert_eq!(m.spec.vocab_size, 32_000);
}

#[test]
fn tiny_preset_works_for_every_family_and_overrides_apply() {
    let dir = Path::new("/nonexistent/never-written");
    for arch in ARCHES {
        let p = plan(&opts(arch, "tiny", dir)).unwrap();
        assert_eq!(p.spec.hidden_size, 64, "{arch}");
        assert_eq!(
            (p.spec.num_heads, p.spec.num_kv_heads, p.spec.head_dim),
            (4, 2, 16)
        );
        assert_eq!(p.spec.vocab_size % 64, 0);
        assert!(p.spec.vocab_size >= p.tokenizer_size && p.spec.vocab_size < p.tokenizer_size + 64);
        assert_eq!(p.spec.tie_word_embeddings, arch != "mistral", "{arch}");
        assert!(presets(arch).unwrap().contains(&"tiny"));
    }
    let mut o = opts("qwen2", "qwen2.5-1.5b", dir);
    o.overrides = SynthOverrides {
        layers: Some(4),
        hidden: Some(256),
        intermediate: Some(512),
        heads: Some(8),
        kv_heads: Some(4),
        vocab: Some(4096),
        max_position: Some(4096),
        tie_word_embeddings: Some(false),
        rope_theta: Some(12345.0),
        head_dim: None,
    };
    let p = plan(&o).unwrap();
    let s = &p.spec;
    assert_eq!(
        (s.num_layers, s.hidden_size, s.intermediate_size),
        (4, 256, 512)
    );
    assert_eq!((s.num_heads, s.num_kv_heads, s.head_dim), (8, 4, 32));
    assert_eq!((s.vocab_size, s.max_position_embeddings), (4096, 4096));
    assert!(!s.tie_word_embeddings);
    assert_eq!(s.rope.theta, 12345.0);
    assert_eq!(p.config.max_window_layers, Some(4));

    // qwen3 keeps the preset's explicit head_dim; tiny derives it from the overridden width.
    let mut o = opts("qwen3", "qwen3-0.6b", dir);
    o.overrides.hidden = Some(512);
    assert_eq!(plan(&o).unwrap().spec.head_dim, 128);
    let mut o = opts("qwen3", "tiny", dir);
    o.overrides.hidden = Some(128);
    assert_eq!(plan(&o).unwrap().spec.head_dim, 32);

    let all = synth::all_presets();
    assert_eq!(all[0].name, "tiny");
    assert_eq!(all.len(), 9);
    assert_eq!(
        presets("Qwen3ForCausalLM").unwrap(),
        vec!["tiny", "qwen3-0.6b", "qwen3-1.7b"]
    );
}

#[test]
fn bad_options_are_clear_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let err = |o: &SynthOptions| {
        let e = synthesize(o, &mut |_| {}).unwrap_err();
        assert!(!dir.exists(), "nothing may be written for {e}");
        e
    };

    let e = err(&opts("gpt2", "tiny", &dir));
    assert!(matches!(e, SynthError::UnknownArch { .. }), "{e}");
    assert!(
        e.to_string().contains("gpt2") && e.to_string().contains("qwen3"),
        "{e}"
    );

    let e = err(&opts("qwen2", "qwen2.5-70b", &dir));
    assert!(matches!(e, SynthError::UnknownPreset { .. }), "{e}");
    assert!(
        e.to_string().contains("qwen2.5-0.5b") && e.to_string().contains("tiny"),
        "{e}"
    );

    let e = err(&opts("llama", "qwen3-0.6b", &dir));
    assert!(matches!(e, SynthError::PresetOfOtherArch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("qwen3") && msg.contains("llama3.2-1b"),
        "{msg}"
    );

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.vocab = Some(100);
    let e = err(&o);
    assert!(e.to_string().contains("--vocab"), "{e}");

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.heads = Some(3);
    o.overrides.kv_heads = Some(1);
    let e = err(&o);
    assert!(matches!(e, SynthError::InvalidConfig { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("--heads 3") && msg.contains("not divisible"),
        "{msg}"
    );

    let mut o = opts("qwen3", "tiny", &dir);
    o.overrides.heads = Some(3);
    o.overrides.kv_heads = Some(1);
    assert!(err(&o).to_string().contains("--head-dim"));

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.layers = Some(0);
    assert!(err(&o).to_string().contains("num_hidden_layers"));

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.rope_theta = Some(-1.0);
    assert!(err(&o).to_string().contains("--rope-theta"));

    let mut o = opts("qwen2", "tiny", &dir);
    o.shards = 0;
    assert!(err(&o).to_string().contains("--shards"));
    o.shards = 1000;
    let e = err(&o);
    assert!(
        e.to_string().contains("--shards") && e.to_string().contains("tensors"),
        "{e}"
    );

    assert_eq!("BF16".parse::<SynthDtype>().unwrap(), SynthDtype::BF16);
    assert_eq!("f32".parse::<SynthDtype>().unwrap(), SynthDtype::F32);
    assert_eq!("float16".parse::<SynthDtype>().unwrap(), SynthDtype::F16);
    let e = "int8".parse::<SynthDtype>().unwrap_err();
    assert!(
        e.to_string().contains("int8") && e.to_string().contains("bf16"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checkpoint files

#[test]
fn tiny_single_file_checkpoint_is_complete_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        let dir = tmp.path().join(arch);
        let mut events = Vec::new();
        let r = synthesize(&opts(arch, "tiny", &dir), &mut |e| events.push(e)).unwrap();
        assert!(!r.reused);
        assert!(matches!(events[0], SynthProgress::Started { .. }));
        assert!(events
            .iter()
            .any(|e| matches!(e, SynthProgress::Weights { done, total } if done == total)));
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "model.safetensors",
            "rabbit_synth.json",
        ] {
            assert!(dir.join(f).is_file(), "{arch}: {f}");
        }
        assert!(!dir.join("model.safetensors.index.json").exists());
        assert_eq!(r.files.last().unwrap(), &dir.join("config.json"));
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // The engine's own loader accepts it and sees the same model.
        let spec = load_spec(&dir).unwrap();
        assert_eq!(spec, r.spec);
        assert_eq!(spec.num_parameters(), r.num_parameters);
        assert_tensors_match_spec(&dir, &spec, safetensors::Dtype::BF16);
        assert_eq!(
            spec.tie_word_embeddings,
            !read_tensors(&dir).contains_key("lm_head.weight")
        );

        let cfg = read_json(&dir.join("config.json"));
        assert_eq!(cfg["torch_dtype"], "bfloat16");
        assert_eq!(cfg["hidden_act"], "silu");
        assert_eq!(cfg["use_cache"], true);
        assert!(cfg["rope_scaling"].is_null());
        assert!(cfg.get("transformers_version").is_some());
        assert!(cfg.get("rope_parameters").is_none(), "classic layout only");
        match arch {
            "llama" => {
                assert_eq!(cfg["attention_bias"], false);
                assert_eq!(cfg["mlp_bias"], false);
            }
            "qwen2" | "qwen3" => {
                assert_eq!(cfg["use_sliding_window"], false);
                assert!(cfg["sliding_window"].is_null());
                assert_eq!(cfg["max_window_layers"], 2);
            }
            _ => assert!(cfg["sliding_window"].is_null()),
        }
        if arch == "qwen3" {
            assert_eq!(cfg["head_dim"], 16);
        }
        let parsed: HfConfig = serde_json::from_value(cfg).unwrap();
        assert_eq!(parsed, r.config);

        // Special token ids agree between the tokenizer and the generation config.
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let eot = tok.token_to_id("<|endoftext|>").unwrap();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let gen = read_json(&dir.join("generation_config.json"));
        assert_eq!(gen["eos_token_id"], serde_json::json!([eot, im_end]));
        assert_eq!(gen["bos_token_id"], eot);
        assert_eq!(gen["do_sample"], false);
        assert_eq!(spec.eos_token_ids, vec![eot, im_end]);
        assert_eq!(r.tokenizer_size, tok.get_vocab_size(true));
    }
}

#[test]
fn sharded_checkpoint_has_a_correct_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q3");
    let mut o = opts("qwen3", "tiny", &dir);
    o.shards = 3;
    o.dtype = SynthDtype::F16;
    let r = run(&o);
    let spec = load_spec(&dir).unwrap();
    assert_tensors_match_spec(&dir, &spec, safetensors::Dtype::F16);
    assert!(!dir.join("model.safetensors").exists());

    let index = read_json(&dir.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let tensors = read_tensors(&dir);
    assert_eq!(map.len(), tensors.len());
    for (name, file) in map {
        assert_eq!(tensors[name].0, file.as_str().unwrap(), "{name}");
    }
    let want_total: u64 = spec
        .tensor_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 2)
        .sum();
    assert_eq!(index["metadata"]["total_size"], want_total);
    let files: HashSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    let expect: HashSet<&str> = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    .into();
    assert_eq!(
        files, expect,
        "every shard is non-empty and named like HF's"
    );
    assert_eq!(r.spec, spec);

    // On a real shape, shards come out roughly equal.
    let mut o = opts("qwen2", "qwen2.5-1.5b", &dir);
    o.shards = 4;
    let p = plan(&o).unwrap();
    assert_eq!(p.weight_files.len(), 4);
    let sizes = shard_sizes(&o);
    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(*max as f64 / *min as f64 <= 1.5, "{sizes:?}");

    // As many shards as tensors works (one tensor each).
    let mut o = opts("llama", "tiny", &tmp.path().join("many"));
    let n = plan(&o).unwrap().spec.tensor_shapes().len();
    o.shards = n;
    run(&o);
    let tensors = read_tensors(&o.out_dir);
    let per_file: HashSet<&String> = tensors.values().map(|(f, _, _)| f).collect();
    assert_eq!(per_file.len(), n);
}

/// Bytes per shard of a plan, from its weight_map (summing tensor sizes per file).
fn shard_sizes(o: &SynthOptions) -> Vec<u64> {
    // The plan does not expose the assignment directly; rebuild it through a tiny copy: the
    // shard planner is deterministic, so check with the same planner on the spec's tensors.
    let p = plan(o).unwrap();
    let tensors = p.spec.tensor_shapes();
    let shards = rabbit_models::synth::weights::plan_shards(&tensors, 2, o.shards);
    assert!(shards.iter().all(|s| !s.tensors.is_empty()));
    let joined: Vec<&String> = shards
        .iter()
        .flat_map(|s| s.tensors.iter().map(|(n, _)| n))
        .collect();
    let order: Vec<&String> = tensors.iter().map(|(n, _)| n).collect();
    assert_eq!(joined, order, "shards keep tensor order");
    shards.iter().map(|s| s.data_bytes).collect()
}

fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_options_give_byte_identical_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = opts("qwen2", "tiny", &tmp.path().join("a"));
    a.shards = 2;
    a.seed = 7;
    let mut b = a.clone();
    b.out_dir = tmp.path().join("b");
    run(&a);
    run(&b);
    let (ca, cb) = (dir_contents(&a.out_dir), dir_contents(&b.out_dir));
    assert_eq!(ca.keys().collect::<Vec<_>>(), cb.keys().collect::<Vec<_>>());
    for (name, bytes) in &ca {
        assert!(
            bytes == &cb[name],
            "{name} differs between two identical runs"
        );
    }

    // Another seed changes the weights (not the layout).
    let mut c = a.clone();
    c.out_dir = tmp.path().join("c");
    c.seed = 8;
    run(&c);
    let cc = dir_contents(&c.out_dir);
    assert_eq!(ca["config.json"], cc["config.json"]);
    assert_eq!(ca["tokenizer.json"], cc["tokenizer.json"]);
    assert_ne!(
        ca["model-00001-of-00002.safetensors"],
        cc["model-00001-of-00002.safetensors"]
    );

    // A tensor's values do not depend on sharding: same seed, one shard, same embedding.
    let mut d = a.clone();
    d.out_dir = tmp.path().join("d");
    d.shards = 1;
    run(&d);
    let emb = |dir: &Path, file: &str| {
        let bytes = fs::read(dir.join(file)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("model.embed_tokens.weight")
            .unwrap()
            .data()
            .to_vec()
    };
    assert_eq!(
        emb(&a.out_dir, "model-00001-of-00002.safetensors"),
        emb(&d.out_dir, "model.safetensors")
    );
}

#[test]
fn identical_request_is_reused_and_other_options_overwrite_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut o = opts("llama", "tiny", &dir);
    let first = run(&o);
    assert!(!first.reused && first.bytes_written > 0);
    let before = dir_contents(&dir);
    let mtime = fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();

    let mut events = Vec::new();
    let again = synthesize(&o, &mut |e| events.push(e)).unwrap();
    assert!(again.reused);
    assert_eq!(events, vec![SynthProgress::Reused]);
    assert_eq!(again.bytes_written, 0);
    assert_eq!(again.total_bytes, first.total_bytes);
    assert_eq!(again.num_parameters, first.num_parameters);
    let mut fa: Vec<PathBuf> = again.files.clone();
    let mut ff: Vec<PathBuf> = first.files.clone();
    fa.sort();
    ff.sort();
    assert_eq!(fa, ff);
    assert_eq!(
        fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert_eq!(dir_contents(&dir), before);

    // Different options: regenerated, the single file replaced by shards.
    o.shards = 2;
    let r = run(&o);
    assert!(!r.reused);
    assert!(!dir.join("model.safetensors").exists());
    assert!(dir.join("model.safetensors.index.json").is_file());
    assert_tensors_match_spec(&dir, &load_spec(&dir).unwrap(), safetensors::Dtype::BF16);

    // Partial output (no config.json: interrupted run) is regenerated, not reused.
    fs::remove_file(dir.join("config.json")).unwrap();
    fs::write(dir.join("model-00002-of-00002.safetensors.tmp"), b"junk").unwrap();
    let r = run(&o);
    assert!(!r.reused);
    assert!(!dir.join("model-00002-of-00002.safetensors.tmp").exists());
    assert!(dir.join("config.json").is_file());

    // A damaged weight file (wrong size) is not reused either.
    fs::write(dir.join("model-00001-of-00002.safetensors"), b"short").unwrap();
    assert!(!run(&o).reused);
    assert_tensors_match_spec(&dir, &load_spec(&dir).unwrap(), safetensors::Dtype::BF16);

    // A directory with someone else's files is refused, and left untouched.
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    fs::write(foreign.join("config.json"), b"{}").unwrap();
    let e = synthesize(&opts("llama", "tiny", &foreign), &mut |_| {}).unwrap_err();
    assert!(matches!(e, SynthError::ForeignDirectory { .. }), "{e}");
    assert!(e.to_string().contains("notes.txt"), "{e}");
    assert_eq!(fs::read(foreign.join("config.json")).unwrap(), b"{}");

    // A file where the directory should be.
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = synthesize(&opts("llama", "tiny", &file), &mut |_| {}).unwrap_err();
    assert!(matches!(e, SynthError::NotADirectory { .. }), "{e}");

    // An existing empty directory is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(!run(&opts("mistral", "tiny", &empty)).reused);
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

#[test]
fn tokenizer_round_trips_and_has_the_special_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t");
    run(&opts("qwen2", "tiny", &dir));
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let n = tok.get_vocab_size(true);
    assert!((300..=1100).contains(&n), "vocab {n}");

    for text in [
        "The rabbit counted the clouds over the river.",
        "Numbers: 3, 12, 7, 0, 21 and 100000.\n\n  indented\ttab",
        "Unicode: ünïcödé, 日本語, emoji 🐇!",
        "",
    ] {
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert!(enc.get_ids().iter().all(|&id| (id as usize) < n));
    }
    // Merges were learnt: common English compresses well below one token per byte.
    let text = "The model reads one word after another and tries to guess what comes next.";
    let enc = tok.encode(text, false).unwrap();
    assert!(
        enc.len() * 3 < text.len(),
        "{} tokens for {} bytes",
        enc.len(),
        text.len()
    );

    let ids: Vec<u32> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|t| tok.token_to_id(t).unwrap())
        .collect();
    assert_eq!(ids, vec![n as u32 - 3, n as u32 - 2, n as u32 - 1]);
    let chat = "<|im_start|>user\nHello<|im_end|>\n";
    let enc = tok.encode(chat, false).unwrap();
    assert_eq!(enc.get_ids()[0], ids[1]);
    assert!(enc.get_ids().contains(&ids[2]));
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), chat);
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "user\nHello\n");

    let cfg = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(cfg["tokenizer_class"], "Qwen2Tokenizer");
    assert!(cfg["bos_token"].is_null());
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["pad_token"], "<|endoftext|>");
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(cfg["model_max_length"], 2048);
    let dec = cfg["added_tokens_decoder"].as_object().unwrap();
    assert_eq!(dec[&ids[2].to_string()]["content"], "<|im_end|>");
    assert_eq!(dec[&ids[0].to_string()]["special"], true);

    // tokenizer.json mirrors Qwen2's pipeline.
    let tj = read_json(&dir.join("tokenizer.json"));
    assert_eq!(tj["normalizer"]["type"], "NFC");
    assert_eq!(tj["pre_tokenizer"]["pretokenizers"][0]["type"], "Split");
    assert_eq!(tj["pre_tokenizer"]["pretokenizers"][1]["type"], "ByteLevel");
    assert_eq!(tj["decoder"]["type"], "ByteLevel");
    assert_eq!(tj["model"]["type"], "BPE");
    let vocab = read_json(&dir.join("vocab.json"));
    assert_eq!(vocab.as_object().unwrap().len(), n - 3);
    let merges = fs::read_to_string(dir.join("merges.txt")).unwrap();
    assert_eq!(
        merges.lines().count() - 1,
        tj["model"]["merges"].as_array().unwrap().len()
    );
}

#[test]
fn tokenizer_training_is_deterministic() {
    let cached = synth::synthetic_tokenizer().unwrap();
    for _ in 0..2 {
        // Each run uses fresh hash maps (fresh random hash seeds).
        let again = synth::tokenizer::train().unwrap();
        assert_eq!(&again, cached);
        assert_eq!(again.tokenizer_json(), cached.tokenizer_json());
    }
}

// ---------------------------------------------------------------------------------------------
// Weights: values and a reference forward pass

fn load_f32(dir: &Path) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let v = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        out.insert(name, v);
    }
    out
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn weight_values_have_the_intended_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts("qwen2", "tiny", &tmp.path().join("w"));
    o.dtype = SynthDtype::F32;
    run(&o);
    let w = load_f32(&o.out_dir);
    let (m, s) = mean_std(&w["model.embed_tokens.weight"]);
    assert!(
        m.abs() < 0.01 && (s - 0.5 / 8.0).abs() < 0.003,
        "embedding mean {m} std {s}"
    );
    let (m, s) = mean_std(&w["model.norm.weight"]);
    assert!((m - 4.0).abs() < 0.05 && s < 0.2, "final norm {m} {s}");
    let (m, s) = mean_std(&w["model.layers.0.mlp.down_proj.weight"]);
    assert!(
        m.abs() < 0.01 && (s - 1.0 / 128f64.sqrt()).abs() < 0.005,
        "down_proj {m} {s}"
    );
    let (m, s) = mean_std(&w["model.layers.1.input_layernorm.weight"]);
    assert!(
        (m - 1.0).abs() < 0.01 && s < 0.05 && s > 0.005,
        "norm {m} {s}"
    );
    let (m, s) = mean_std(&w["model.layers.1.self_attn.k_proj.bias"]);
    assert!(m.abs() < 0.02 && s < 0.05, "bias {m} {s}");
    assert!(w.values().flatten().all(|x| x.is_finite()));
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| (v as f64 * r) as f32 * g)
        .collect()
}

/// y = W x (+ b), W row-major [out, in].
fn linear(w: &[f32], b: Option<&Vec<f32>>, x: &[f32]) -> Vec<f32> {
    let cols = x.len();
    let rows = w.len() / cols;
    (0..rows)
        .map(|r| {
            let dot: f32 = w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum();
            dot + b.map_or(0.0, |b| b[r])
        })
        .collect()
}

fn rope(v: &mut [f32], pos: usize, theta: f64) {
    let d = v.len();
    let half = d / 2;
    for i in 0..half {
        let inv = theta.powf(-(2.0 * i as f64) / d as f64);
        let (s, c) = (pos as f64 * inv).sin_cos();
        let (a, b) = (v[i] as f64, v[i + half] as f64);
        v[i] = (a * c - b * s) as f32;
        v[i + half] = (b * c + a * s) as f32;
    }
}

/// Logits of the last position: a plain f32 implementation of the Llama-lineage decoder.
fn forward(spec: &ModelSpec, w: &HashMap<String, Vec<f32>>, tokens: &[u32]) -> Vec<f32> {
    let (h, hd) = (spec.hidden_size, spec.head_dim);
    let (nh, nkv) = (spec.num_heads, spec.num_kv_heads);
    let eps = spec.rms_norm_eps;
    let emb = &w["model.embed_tokens.weight"];
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in 0..spec.num_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let g = |n: &str| &w[&p(n)];
        let bias = |n: &str| w.get(&p(n));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let hn = rms_norm(x, g("input_layernorm.weight"), eps);
            let mut q = linear(
                g("self_attn.q_proj.weight"),
                bias("self_attn.q_proj.bias"),
                &hn,
            );
            let mut k = linear(
                g("self_attn.k_proj.weight"),
                bias("self_attn.k_proj.bias"),
                &hn,
            );
            let v = linear(
                g("self_attn.v_proj.weight"),
                bias("self_attn.v_proj.bias"),
                &hn,
            );
            for (t, n, norm) in [
                (&mut q, nh, "self_attn.q_norm.weight"),
                (&mut k, nkv, "self_attn.k_norm.weight"),
            ] {
                for head in 0..n {
                    let s = &mut t[head * hd..(head + 1) * hd];
                    if spec.qk_norm {
                        let normed = rms_norm(s, g(norm), eps);
                        s.copy_from_slice(&normed);
                    }
                    rope(s, pos, spec.rope.theta);
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (i, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f32; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &ks[j][kvh * hd..(kvh + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    let v = &vs[j][kvh * hd..(kvh + 1) * hd];
                    for d in 0..hd {
                        attn[head * hd + d] += (ej / z) as f32 * v[d];
                    }
                }
            }
            let o = linear(g("self_attn.o_proj.weight"), None, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms_norm(x, g("post_attention_layernorm.weight"), eps);
            let gate = linear(g("mlp.gate_proj.weight"), None, &hn);
            let up = linear(g("mlp.up_proj.weight"), None, &hn);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&a, &b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            let down = linear(g("mlp.down_proj.weight"), None, &act);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    let last = rms_norm(xs.last().unwrap(), &w["model.norm.weight"], eps);
    let head = if spec.tie_word_embeddings {
        emb
    } else {
        &w["lm_head.weight"]
    };
    linear(head, None, &last)
}

#[test]
fn tiny_model_greedy_decoding_is_not_degenerate() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        let mut o = opts(arch, "tiny", &tmp.path().join(arch));
        o.dtype = SynthDtype::F32;
        o.seed = 0; // the CLI's default
        run(&o);
        let spec = load_spec(&o.out_dir).unwrap();
        let w = load_f32(&o.out_dir);
        let tok = tokenizers::Tokenizer::from_file(o.out_dir.join("tokenizer.json")).unwrap();
        let mut ids = tok
            .encode("The rabbit counted the clouds", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let prompt = ids.len();
        let mut stds = Vec::new();
        for _ in 0..24 {
            let logits = forward(&spec, &w, &ids);
            assert_eq!(logits.len(), spec.vocab_size);
            stds.push(mean_std(&logits).1);
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            ids.push(next);
        }
        let generated = &ids[prompt..];
        let distinct: HashSet<_> = generated.iter().collect();
        let text = tok.decode(generated, false).unwrap();
        eprintln!(
            "{arch}: {} distinct of {}: {text:?}; logits std {stds:.2?}",
            distinct.len(),
            generated.len()
        );
        assert!(
            distinct.len() >= 8,
            "{arch}: greedy decode is degenerate: {generated:?}"
        );
        assert!(
            stds.iter().all(|&s| (0.5..8.0).contains(&s)),
            "{arch}: logits std {stds:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming: memory does not grow with the checkpoint

fn status_kb(field: &str) -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"))
}

const RSS_ENV: &str = "RABBIT_SYNTH_RSS_DIR";

/// Child half of `streaming_keeps_memory_bounded`: writes a ~530 MB checkpoint and prints how
/// much the peak RSS grew meanwhile.
#[test]
#[ignore = "run by streaming_keeps_memory_bounded in a child process"]
fn rss_child() {
    let Ok(dir) = std::env::var(RSS_ENV) else {
        return;
    };
    let mut o = opts("qwen2", "tiny", Path::new(&dir));
    o.dtype = SynthDtype::F32;
    o.overrides = SynthOverrides {
        hidden: Some(1024),
        intermediate: Some(4096),
        vocab: Some(50_048),
        tie_word_embeddings: Some(false),
        ..SynthOverrides::default()
    };
    // Build the tokenizer first so that its (small, one-off) memory is in the baseline.
    synth::synthetic_tokenizer().unwrap();
    let before = status_kb("VmRSS:");
    let r = synthesize(&o, &mut |_| {}).unwrap();
    let peak = status_kb("VmHWM:");
    println!(
        "RSS_RESULT bytes={} growth_kb={}",
        r.bytes_written,
        peak.saturating_sub(before)
    );
}

#[test]
fn streaming_keeps_memory_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rss_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RSS_ENV, tmp.path().join("big"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("RSS_RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no result from the child: {stdout}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (bytes, growth_kb) = (field("bytes="), field("growth_kb="));
    assert!(
        bytes > 400_000_000,
        "the checkpoint must dwarf the bound: {bytes}"
    );
    assert!(
        growth_kb < 100 * 1024,
        "peak RSS grew by {growth_kb} kB while writing {bytes} bytes"
    );
    eprintln!("wrote {bytes} bytes with a peak RSS growth of {growth_kb} kB");
}
