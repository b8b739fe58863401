//! Bad input and full disks: a clear error naming the file / tensor / directory, no panic, and
//! nothing left behind that looks complete.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use rabbit_split::{testing, Manifest, SplitError, SplitOptions, UnitKind, UnitSpec};

/// A split attempt on `ckpt` into a fresh out dir: returns the error, and checks nothing at all
/// was written.
fn split_err(ckpt: &Path, spec: &Spec) -> (SplitError, PathBuf) {
    split_err_with(ckpt, &layout(spec))
}

fn split_err_with(ckpt: &Path, layout: &rabbit_split::Layout) -> (SplitError, PathBuf) {
    let out = ckpt.parent().unwrap().join("out");
    let e = run_split(ckpt, layout, &opts_to(&out)).unwrap_err();
    // Input is validated before anything is created.
    assert!(
        !out.exists(),
        "bad input must leave no output directory ({e})"
    );
    (e, out)
}

fn assert_no_complete_looking_output(out: &Path) {
    if out.exists() {
        let names = file_names(out);
        assert!(!names.iter().any(|n| n == "manifest.json"), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }
}

fn fixture(spec: &Spec) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, spec);
    (tmp, ckpt)
}

/// Writes a safetensors file by hand from a JSON header and raw data (possibly inconsistent).
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    fs::write(path, b).unwrap();
}

/// A one-layer checkpoint whose weights file is replaced by `header` + `data`.
fn raw_fixture(header: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let (tmp, ckpt) = fixture(&Spec::tiny());
    write_raw(&ckpt.join("model.safetensors"), header, data);
    (tmp, ckpt)
}

fn msg_has(e: &SplitError, parts: &[&str]) {
    let m = e.to_string();
    for p in parts {
        assert!(m.contains(p), "message {m:?} lacks {p:?}");
    }
}

#[test]
fn missing_or_broken_config() {
    let (_t, ckpt) = fixture(&Spec::tiny());
    fs::remove_file(ckpt.join("config.json")).unwrap();
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(
        matches!(&e, SplitError::MissingConfig { dir } if dir == &ckpt),
        "{e:?}"
    );
    msg_has(&e, &["missing config.json in", &ckpt.to_string_lossy()]);
    let e = rabbit_split::read_config_json(&ckpt).unwrap_err();
    assert!(matches!(e, SplitError::MissingConfig { .. }));

    fs::write(ckpt.join("config.json"), b"{\"architectures\": [").unwrap();
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(matches!(e, SplitError::BadConfig { .. }), "{e:?}");
    msg_has(&e, &["config.json"]);
}

#[test]
fn missing_weights_and_shards() {
    let spec = Spec {
        shards: 3,
        ..Spec::tiny()
    };
    let (_t, ckpt) = fixture(&spec);
    fs::remove_file(ckpt.join("model-00002-of-00003.safetensors")).unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::MissingShard { shard, .. } if shard == "model-00002-of-00003.safetensors"),
        "{e:?}"
    );
    msg_has(
        &e,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00003.safetensors",
        ],
    );

    fs::remove_file(ckpt.join("model.safetensors.index.json")).unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(matches!(e, SplitError::MissingWeights { .. }), "{e:?}");

    fs::write(
        ckpt.join("model.safetensors.index.json"),
        b"{\"weight_map\": 3}",
    )
    .unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(matches!(e, SplitError::BadIndex { .. }), "{e:?}");
    fs::write(
        ckpt.join("model.safetensors.index.json"),
        b"{\"weight_map\": {\"a\": \"../model-00001-of-00003.safetensors\"}}",
    )
    .unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(matches!(e, SplitError::BadIndex { .. }), "{e:?}");
}

#[test]
fn index_entry_not_in_its_shard_and_duplicates() {
    let spec = Spec {
        shards: 2,
        ..Spec::tiny()
    };
    let (_t, ckpt) = fixture(&spec);
    let idx = ckpt.join("model.safetensors.index.json");
    let orig = fs::read(&idx).unwrap();
    let mut j: serde_json::Value = serde_json::from_slice(&orig).unwrap();
    j["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors".into();
    fs::write(&idx, serde_json::to_vec(&j).unwrap()).unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::TensorNotInShard { tensor, shard, .. }
            if tensor == "model.norm.weight" && shard == "model-00001-of-00002.safetensors"),
        "{e:?}"
    );
    msg_has(
        &e,
        &["model.norm.weight", "model-00001-of-00002.safetensors"],
    );

    let mut j: serde_json::Value = serde_json::from_slice(&orig).unwrap();
    j["weight_map"]["model.layers.9.ghost"] = "model-00002-of-00002.safetensors".into();
    fs::write(&idx, serde_json::to_vec(&j).unwrap()).unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::TensorNotInShard { tensor, .. } if tensor == "model.layers.9.ghost")
    );

    // The same tensor in two shards.
    fs::write(&idx, &orig).unwrap();
    let dup = ckpt.join("model-00002-of-00002.safetensors");
    let data = tensor_data("model.embed_tokens.weight", 40 * 16 * 2, 1);
    let mut j: serde_json::Value = serde_json::from_slice(&orig).unwrap();
    write_st(
        &dup,
        &[(
            "model.embed_tokens.weight".into(),
            rabbit_split::Dtype::BF16,
            vec![40, 16],
            data,
        )],
    );
    let map = j["weight_map"].as_object_mut().unwrap();
    for v in map.values_mut() {
        *v = "model-00001-of-00002.safetensors".into();
    }
    map.insert(
        "model.embed_tokens.weight".into(),
        "model-00002-of-00002.safetensors".into(),
    );
    fs::write(&idx, serde_json::to_vec(&j).unwrap()).unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::DuplicateTensor { tensor, .. } if tensor == "model.embed_tokens.weight"),
        "{e:?}"
    );
}

#[test]
fn truncated_file() {
    let (_t, ckpt) = fixture(&Spec::tiny());
    let w = ckpt.join("model.safetensors");
    let b = fs::read(&w).unwrap();
    fs::write(&w, &b[..b.len() - 100]).unwrap();
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    match &e {
        SplitError::Truncated {
            file,
            expected,
            actual,
        } => {
            assert_eq!(file, &w);
            assert_eq!(*expected, b.len() as u64);
            assert_eq!(*actual, b.len() as u64 - 100);
        }
        other => panic!("{other:?}"),
    }
    msg_has(&e, &["model.safetensors", "truncated"]);

    fs::write(&w, &b[..5]).unwrap();
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(matches!(e, SplitError::Truncated { .. }), "{e:?}");
}

#[test]
fn corrupt_headers() {
    // Not JSON.
    let (_t, ckpt) = raw_fixture("{\"a\": {\"dtype\": \"F32\", oops", &[0; 4]);
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(
        matches!(&e, SplitError::BadHeader { file, .. } if file.ends_with("model.safetensors"))
    );
    msg_has(&e, &["model.safetensors", "not valid JSON"]);

    // Header length larger than the file.
    let (_t, ckpt) = fixture(&Spec::tiny());
    let w = ckpt.join("model.safetensors");
    let mut b = fs::read(&w).unwrap();
    let twice = b.len() as u64 * 2;
    b[..8].copy_from_slice(&twice.to_le_bytes());
    fs::write(&w, &b).unwrap();
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(matches!(e, SplitError::BadHeader { .. }), "{e:?}");
    msg_has(&e, &["model.safetensors", "header length"]);

    // Absurd header length.
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&w, &b).unwrap();
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(matches!(e, SplitError::BadHeader { .. }), "{e:?}");

    // Trailing garbage after the last tensor.
    let (_t, ckpt) = raw_fixture(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 9],
    );
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    assert!(matches!(e, SplitError::BadHeader { .. }), "{e:?}");
}

#[test]
fn unknown_dtype_names_file_tensor_and_dtype() {
    let (_t, ckpt) = raw_fixture(
        r#"{"model.embed_tokens.weight":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let (e, _) = split_err(&ckpt, &Spec::tiny());
    match &e {
        SplitError::UnknownDtype {
            file,
            tensor,
            dtype,
        } => {
            assert!(file.ends_with("model.safetensors"));
            assert_eq!(tensor, "model.embed_tokens.weight");
            assert_eq!(dtype, "Q4_K");
        }
        other => panic!("{other:?}"),
    }
    msg_has(
        &e,
        &["Q4_K", "model.embed_tokens.weight", "model.safetensors"],
    );
}

#[test]
fn offsets_out_of_range_overlapping_or_inconsistent() {
    let cases = [
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[100,104]}}"#,
            8usize,
            "b",
            "out of range",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "b",
            "overlap",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
            "a",
            "needs 12",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            8,
            "a",
            "end before",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "a",
            "gap",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
            "a",
            "shape",
        ),
        (
            r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#,
            4,
            "a",
            "dtype",
        ),
    ];
    for (header, len, tensor, why) in cases {
        let (_t, ckpt) = raw_fixture(header, &vec![0u8; len]);
        let (e, _) = split_err(&ckpt, &Spec::tiny());
        match &e {
            SplitError::BadTensor {
                tensor: t, file, ..
            } => {
                assert_eq!(t, tensor, "{header}");
                assert!(file.ends_with("model.safetensors"));
            }
            other => panic!("{header}: {other:?}"),
        }
        msg_has(&e, &[why, "model.safetensors"]);
    }
}

#[test]
fn tensors_outside_the_layout_are_named() {
    let spec = Spec {
        extras: true,
        ..Spec::tiny()
    };
    let (_t, ckpt) = fixture(&spec);
    let mut l = layout(&spec);
    // Drop the optional extras of layer 1 and the inv_freq rule: those tensors are now unclaimed.
    l.units[2].optional.clear();
    l.ignored_suffixes.clear();
    let (e, _) = split_err_with(&ckpt, &l);
    let SplitError::UnclaimedTensors {
        names,
        architecture,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(architecture, "Qwen2ForCausalLM");
    let mut expected: Vec<String> = [
        "extra.bytes",
        "extra.counter",
        "extra.mask",
        "extra.odd_half",
        "extra.scale",
    ]
    .iter()
    .map(|s| format!("model.layers.1.{s}"))
    .collect();
    for i in 0..spec.layers {
        expected.push(format!("model.layers.{i}.self_attn.rotary_emb.inv_freq"));
    }
    expected.sort();
    assert_eq!(names, &expected);
    msg_has(&e, &["8 checkpoint tensor(s)", "model.layers.1.extra.mask"]);
}

#[test]
fn layer_missing_a_required_tensor_names_layer_and_tensor() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    // Rewrite the checkpoint without layer 1's down projection.
    let w = ckpt.join("model.safetensors");
    let bytes = fs::read(&w).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.weight")
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    fs::write(&w, out).unwrap();
    let (e, _) = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::MissingTensor { unit, tensor }
            if unit == "layer.001" && tensor == "model.layers.1.mlp.down_proj.weight"),
        "{e:?}"
    );
    msg_has(&e, &["layer.001", "model.layers.1.mlp.down_proj.weight"]);
}

#[test]
fn invalid_layouts_and_options_are_rejected() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let mut l = layout(&spec);
    l.units[2].name = "layer.000".into();
    let (e, _) = split_err_with(&ckpt, &l);
    assert!(matches!(e, SplitError::InvalidLayout { .. }), "{e:?}");
    let mut l = layout(&spec);
    l.units[1].name = "../evil".into();
    let (e, _) = split_err_with(&ckpt, &l);
    assert!(matches!(e, SplitError::InvalidLayout { .. }), "{e:?}");
    let mut l = layout(&spec);
    l.units[2].kind = UnitKind::Layer(5);
    let (e, _) = split_err_with(&ckpt, &l);
    assert!(matches!(e, SplitError::InvalidLayout { .. }), "{e:?}");
    let mut l = layout(&spec);
    l.units.push(UnitSpec {
        name: "again".into(),
        kind: UnitKind::FinalNorm,
        required: vec!["model.norm.weight".into()],
        optional: vec![],
    });
    let (e, _) = split_err_with(&ckpt, &l);
    assert!(matches!(e, SplitError::InvalidLayout { .. }), "{e:?}");

    for alignment in [0, 100, 4] {
        let opts = SplitOptions {
            alignment,
            ..SplitOptions::default()
        };
        let e = run_split(&ckpt, &spec_layout(&spec), &opts).unwrap_err();
        assert!(matches!(e, SplitError::InvalidOptions { .. }), "{e:?}");
    }
}

#[test]
fn splitting_into_the_checkpoint_dir_never_overwrites_source_files() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let before = fs::read(ckpt.join("model.safetensors")).unwrap();
    let mut l = layout(&spec);
    l.units[0].name = "model".into(); // would be model.safetensors
    let e = run_split(&ckpt, &l, &opts_to(&ckpt)).unwrap_err();
    assert!(matches!(e, SplitError::InvalidOptions { .. }), "{e:?}");
    msg_has(&e, &["overwrite", "model.safetensors"]);
    assert_eq!(fs::read(ckpt.join("model.safetensors")).unwrap(), before);
    // Without a collision, the checkpoint dir is a valid destination.
    run_split(&ckpt, &layout(&spec), &opts_to(&ckpt)).unwrap();
    assert!(rabbit_split::verify(&ckpt).unwrap().is_ok());
    assert_eq!(fs::read(ckpt.join("model.safetensors")).unwrap(), before);
}

fn spec_layout(spec: &Spec) -> rabbit_split::Layout {
    layout(spec)
}

fn reference_split(spec: &Spec, tmp: &Path) -> (PathBuf, PathBuf) {
    let ckpt = tmp.join("model");
    write_checkpoint(&ckpt, spec);
    let reference = tmp.join("reference");
    run_split(&ckpt, &layout(spec), &opts_to(&reference)).unwrap();
    (ckpt, reference)
}

#[test]
fn disk_full_mid_write_leaves_no_complete_looking_output_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec {
        layers: 6,
        hidden: 64,
        inter: 128,
        ..Spec::tiny()
    };
    let (ckpt, reference) = reference_split(&spec, tmp.path());
    let l = layout(&spec);
    let out = tmp.path().join("out");
    let sizes: Vec<u64> = Manifest::load(&reference)
        .unwrap()
        .units
        .iter()
        .map(|u| u.size)
        .collect();

    // Budgets that fail: inside the plan file, inside the header of a unit, in the middle of a
    // unit's data, and right at the manifest.
    let plan_len = fs::metadata(reference.join("split.plan.json"))
        .unwrap()
        .len();
    let after_units: u64 = plan_len + sizes.iter().sum::<u64>();
    let budgets = [
        10,
        plan_len + 100,
        plan_len + sizes[0] + sizes[1] + sizes[2] / 2,
        after_units + 10,
    ];
    for budget in budgets {
        let _ = fs::remove_dir_all(&out);
        testing::fail_writes_after(Some(budget));
        let res = run_split(&ckpt, &l, &opts_to(&out));
        testing::fail_writes_after(None);
        let e = res.unwrap_err();
        let SplitError::DiskFull { path, .. } = &e else {
            panic!("budget {budget}: {e:?}")
        };
        assert!(path.starts_with(&out), "{}", path.display());
        msg_has(&e, &["disk full while writing", &out.to_string_lossy()]);
        assert_no_complete_looking_output(&out);
        // Every unit file that exists under its final name is complete and correct.
        let reference_files = dir_files(&reference);
        for (name, bytes) in dir_files(&out) {
            if name.ends_with(".safetensors") {
                assert!(
                    bytes == reference_files[&name],
                    "budget {budget}: {name} is wrong"
                );
            }
        }
        // With room again, the rerun completes to the same bytes.
        run_split(&ckpt, &l, &opts_to(&out)).unwrap();
        assert_same_dir(&out, &reference);
    }
}

#[test]
fn free_space_is_checked_for_the_bytes_still_to_write() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec {
        layers: 4,
        ..Spec::tiny()
    };
    let (ckpt, reference) = reference_split(&spec, tmp.path());
    let l = layout(&spec);
    let m = Manifest::load(&reference).unwrap();
    let total: u64 = m.units.iter().map(|u| u.size).sum();
    let out = tmp.path().join("out");

    testing::override_available_space(Some(1000));
    let e = run_split(&ckpt, &l, &opts_to(&out)).unwrap_err();
    testing::override_available_space(None);
    match &e {
        SplitError::NoSpace {
            dir,
            needed,
            available,
        } => {
            assert_eq!(dir, &out);
            assert_eq!(*needed, total);
            assert_eq!(*available, 1000);
        }
        other => panic!("{other:?}"),
    }
    msg_has(
        &e,
        &[
            "not enough disk space",
            &out.to_string_lossy(),
            "1000 bytes",
        ],
    );
    assert!(!file_names(&out).iter().any(|n| n.ends_with(".safetensors")));

    // Interrupt after three units, then only the remaining bytes are needed.
    let budget = fs::metadata(reference.join("split.plan.json"))
        .unwrap()
        .len()
        + m.units[..3].iter().map(|u| u.size).sum::<u64>();
    testing::fail_writes_after(Some(budget + 10));
    assert!(run_split(&ckpt, &l, &opts_to(&out)).is_err());
    testing::fail_writes_after(None);
    let remaining: u64 = m.units[3..].iter().map(|u| u.size).sum();
    testing::override_available_space(Some(remaining - 1));
    let e = run_split(&ckpt, &l, &opts_to(&out)).unwrap_err();
    assert!(
        matches!(e, SplitError::NoSpace { needed, .. } if needed == remaining),
        "{e:?}"
    );
    testing::override_available_space(Some(remaining));
    let (_, _, events) = run_split(&ckpt, &l, &opts_to(&out)).unwrap();
    testing::override_available_space(None);
    assert_eq!(
        events[0],
        rabbit_split::SplitEvent::Planned {
            units: m.units.len(),
            bytes: remaining,
            already_done: 3
        }
    );
    assert_same_dir(&out, &reference);
}

/// A real small filesystem, when this process may mount one (root in a sandbox): statvfs must
/// report the shortage before anything is written. Skipped elsewhere.
#[test]
fn free_space_check_on_a_real_small_tmpfs() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec {
        layers: 4,
        hidden: 128,
        inter: 256,
        vocab: 1024,
        ..Spec::tiny()
    };
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let mnt = tmp.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let out = mnt.join("split");
    let e = run_split(&ckpt, &layout(&spec), &opts_to(&out)).unwrap_err();
    match &e {
        SplitError::NoSpace {
            dir,
            needed,
            available,
        } => {
            assert_eq!(dir, &out);
            assert!(*available <= 512 << 10 && needed > available, "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_no_complete_looking_output(&out);
}
