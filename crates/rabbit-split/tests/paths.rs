//! What is at a path matters: a directory, FIFO or symlink loop where a weight file belongs gets
//! its own message; a FIFO in a split is replaced without hanging; a directory of someone
//! else's files is never written into; duplicate tensor names are called duplicates.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use rabbit_split::{
    is_current, verify, Compression, Manifest, SplitError, SplitOptions, SplitOutcome,
};

fn fixture(spec: &Spec) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, spec);
    (tmp, ckpt)
}

fn split_err(ckpt: &Path, spec: &Spec) -> SplitError {
    let out = ckpt.parent().unwrap().join("out");
    let (ckpt, spec) = (ckpt.to_path_buf(), spec.clone());
    within_a_minute("splitting", move || {
        run_split(&ckpt, &layout(&spec), &opts_to(&out)).unwrap_err()
    })
}

#[test]
fn a_non_file_in_place_of_the_weights_is_named_not_called_missing() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let w = ckpt.join("model.safetensors");
    fs::remove_file(&w).unwrap();
    // Before: all four were "no safetensors weights in ..." (and the FIFO was skipped only
    // because is_file() said no).
    fs::create_dir(&w).unwrap();
    let e = split_err(&ckpt, &spec);
    assert!(matches!(e, SplitError::NotAFile { .. }), "{e:?}");
    assert!(
        e.to_string().contains("model.safetensors is a directory"),
        "{e}"
    );
    fs::remove_dir(&w).unwrap();
    mkfifo(&w);
    let e = split_err(&ckpt, &spec);
    assert!(e.to_string().contains("model.safetensors is a FIFO"), "{e}");
    fs::remove_file(&w).unwrap();
    std::os::unix::fs::symlink(&w, &w).unwrap();
    let e = split_err(&ckpt, &spec);
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    assert!(!e.to_string().contains("no safetensors weights"), "{e}");
    fs::remove_file(&w).unwrap();
    std::os::unix::fs::symlink(ckpt.join("gone.safetensors"), &w).unwrap();
    let e = split_err(&ckpt, &spec);
    assert!(
        e.to_string()
            .contains("gone.safetensors, which does not exist"),
        "{e}"
    );
    // A FIFO config.json fails instead of blocking.
    fs::remove_file(&w).unwrap();
    fs::remove_file(ckpt.join("config.json")).unwrap();
    mkfifo(&ckpt.join("config.json"));
    let e = split_err(&ckpt, &spec);
    assert!(e.to_string().contains("config.json is a FIFO"), "{e}");
}

#[test]
fn a_shard_that_is_a_directory_is_named() {
    let spec = Spec {
        shards: 2,
        ..Spec::tiny()
    };
    let (_t, ckpt) = fixture(&spec);
    let shard = ckpt.join("model-00002-of-00002.safetensors");
    fs::remove_file(&shard).unwrap();
    fs::create_dir(&shard).unwrap();
    let e = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::NotAFile { path, .. } if *path == shard),
        "{e:?}"
    );
}

/// A header whose JSON names one tensor twice: serde_json keeps the last entry, so this used to
/// read as "data_offsets [0, 4] overlap those of tensor a".
#[test]
fn a_tensor_named_twice_in_a_header_or_an_index_is_a_duplicate() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 8]);
    fs::write(ckpt.join("model.safetensors"), bytes).unwrap();
    let e = split_err(&ckpt, &spec);
    assert!(
        matches!(&e, SplitError::BadTensor { tensor, .. } if tensor == "b"),
        "{e:?}"
    );
    assert!(e.to_string().contains("appears twice"), "{e}");
    assert!(!e.to_string().contains("overlap"), "{e}");

    let spec = Spec {
        shards: 2,
        ..Spec::tiny()
    };
    let (_t, ckpt) = fixture(&spec);
    let idx = ckpt.join("model.safetensors.index.json");
    let text = fs::read_to_string(&idx).unwrap();
    let dup = text.replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\n    \"model.norm.weight\": \"model-00001-of-00002.safetensors\",",
        1,
    );
    fs::write(&idx, dup).unwrap();
    let e = split_err(&ckpt, &spec);
    assert!(matches!(e, SplitError::BadIndex { .. }), "{e:?}");
    assert!(
        e.to_string().contains("model.norm.weight more than once"),
        "{e}"
    );
}

#[test]
fn a_fifo_in_place_of_a_unit_is_replaced_without_hanging_and_the_manifest_survives() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let l = layout(&spec);
    let (dir, _, _) = run_split(&ckpt, &l, &SplitOptions::default()).unwrap();
    let reference = dir_files(&dir);
    let victim = dir.join("layer.000.safetensors");
    fs::remove_file(&victim).unwrap();
    mkfifo(&victim);
    assert!(!is_current(&dir, &ckpt, &l, &SplitOptions::default()).unwrap());
    let (c, l2, d) = (ckpt.clone(), l.clone(), dir.clone());
    let (outcome, manifest_always_there) = within_a_minute("splitting over a FIFO", move || {
        let mut there = true;
        let (_, outcome) = rabbit_split::split(&c, &l2, &SplitOptions::default(), &mut |_| {
            there &= d.join("manifest.json").is_file();
        })
        .unwrap();
        (outcome, there)
    });
    assert!(
        matches!(
            outcome,
            SplitOutcome::Written {
                units_written: 1,
                ..
            }
        ),
        "{outcome:?}"
    );
    // A repair of the same split keeps its manifest: nothing is ever half-destroyed.
    assert!(manifest_always_there);
    assert_eq!(dir_files(&dir), reference);
    assert!(verify(&dir).unwrap().is_ok());
}

#[test]
fn a_directory_of_other_files_is_refused_and_left_untouched() {
    let spec = Spec::tiny();
    let (tmp, ckpt) = fixture(&spec);
    let out = tmp.path().join("mine");
    fs::create_dir(&out).unwrap();
    let files = [
        ("manifest.json", &b"{\"my\": \"data\"}"[..]),
        ("embed.safetensors", b"not a split"),
        ("notes.tmp", b"draft"),
        ("layer.000.safetensors.tmp", b"mine too"),
    ];
    for (n, b) in files {
        fs::write(out.join(n), b).unwrap();
    }
    // Before: the split overwrote manifest.json and embed.safetensors and deleted the .tmp.
    let e = run_split(&ckpt, &layout(&spec), &opts_to(&out)).unwrap_err();
    assert!(matches!(e, SplitError::ForeignDirectory { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&*out.to_string_lossy()) && msg.contains("manifest.json"),
        "{msg}"
    );
    for (n, b) in files {
        assert_eq!(fs::read(out.join(n)).unwrap(), b, "{n}");
    }
    assert_eq!(file_names(&out).len(), files.len());
    // A file where the directory should be.
    let e = run_split(&ckpt, &layout(&spec), &opts_to(&out.join("notes.tmp"))).unwrap_err();
    assert!(matches!(e, SplitError::NotADirectory { .. }), "{e:?}");
    // An empty directory, or one with a split of ours, is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    run_split(&ckpt, &layout(&spec), &opts_to(&empty)).unwrap();
    fs::write(empty.join("NOTES.txt"), b"mine").unwrap();
    let mut other = layout(&spec);
    other.ignored_suffixes.push("x".into());
    run_split(&ckpt, &other, &opts_to(&empty)).unwrap();
    assert_eq!(fs::read(empty.join("NOTES.txt")).unwrap(), b"mine");
}

#[test]
fn delete_original_keeps_the_other_splits_of_the_same_weights_usable() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let l = layout(&spec);
    let nf4 = SplitOptions {
        compression: Some(Compression::Nf4),
        ..SplitOptions::default()
    };
    let (nf4_dir, _, _) = run_split(&ckpt, &l, &nf4).unwrap();
    let del = SplitOptions {
        delete_original: true,
        ..SplitOptions::default()
    };

    // A dependent split that is damaged could no longer be repaired: refused, nothing deleted.
    let victim = nf4_dir.join("layer.001.safetensors");
    let good = fs::read(&victim).unwrap();
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1;
    fs::write(&victim, &bad).unwrap();
    let e = run_split(&ckpt, &l, &del).unwrap_err();
    assert!(matches!(e, SplitError::DependentSplit { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("rabbit-split-4bit") && msg.contains("layer.001"),
        "{msg}"
    );
    assert!(ckpt.join("model.safetensors").exists());

    // Repaired, the deletion marks it the only copy too: it keeps being reused (before, it
    // became "no safetensors weights" while verifying fine).
    fs::write(&victim, &good).unwrap();
    run_split(&ckpt, &l, &del).unwrap();
    assert!(!ckpt.join("model.safetensors").exists());
    assert!(Manifest::load(&nf4_dir).unwrap().original_deleted);
    assert!(is_current(&nf4_dir, &ckpt, &l, &nf4).unwrap());
    let (_, outcome, _) = run_split(&ckpt, &l, &nf4).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);
    assert!(verify(&nf4_dir).unwrap().is_ok());
}
