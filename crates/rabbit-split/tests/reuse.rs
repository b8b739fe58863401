//! Reuse of a current split, redo of a stale one, and deletion of the originals.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use rabbit_split::{
    is_current, verify, Manifest, SplitError, SplitEvent, SplitOptions, SplitOutcome,
};

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn setup(spec: &Spec) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, spec);
    (tmp, ckpt)
}

fn assert_redone(ckpt: &Path, spec: &Spec, opts: &SplitOptions, what: &str) {
    let layout = layout(spec);
    let dir = opts.split_dir(ckpt);
    assert!(
        !is_current(&dir, ckpt, &layout, opts).unwrap(),
        "{what}: stale split reported current"
    );
    let (_, outcome, events) = run_split(ckpt, &layout, opts).unwrap();
    assert!(!events.contains(&SplitEvent::Reused), "{what}: {events:?}");
    match outcome {
        SplitOutcome::Written {
            units_written,
            units_resumed,
            ..
        } => {
            assert_eq!(units_written, layout.units.len(), "{what}");
            assert_eq!(units_resumed, 0, "{what}");
        }
        o => panic!("{what}: {o:?}"),
    }
    let m = Manifest::load(&dir).unwrap();
    assert_eq!(
        m.source_fingerprint,
        rabbit_split::source_fingerprint(ckpt).unwrap(),
        "{what}"
    );
    assert!(verify(&dir).unwrap().is_ok(), "{what}");
    assert!(is_current(&dir, ckpt, &layout, opts).unwrap(), "{what}");
}

#[test]
fn current_split_is_reused_without_reading_tensor_data() {
    let spec = Spec {
        layers: 8,
        hidden: 128,
        inter: 256,
        vocab: 512,
        ..Spec::tiny()
    };
    let (_tmp, ckpt) = setup(&spec);
    let layout = layout(&spec);
    let opts = SplitOptions::default();
    // Files count as settled, as on a later run (see rabbit_split::integrity).
    rabbit_split::testing::skew_clock(60);
    let (dir, first, _) = run_split(&ckpt, &layout, &opts).unwrap();
    rabbit_split::testing::skew_clock(0);
    assert!(matches!(first, SplitOutcome::Written { .. }));
    let before = dir_files(&dir);

    // Replace the source's tensor bytes with garbage of the same size and mtime: a reuse check
    // that read tensor data (or re-split) would notice; a stat-based one cannot.
    let w = ckpt.join("model.safetensors");
    let t = mtime(&w);
    let mut bytes = fs::read(&w).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 10_000..] {
        *b ^= 0x5a;
    }
    fs::write(&w, &bytes).unwrap();
    set_mtime(&w, t);

    let record = dir.join(rabbit_split::integrity::VERIFIED_FILE);
    let record_before = fs::read(&record).unwrap();
    assert!(is_current(&dir, &ckpt, &layout, &opts).unwrap());
    let (dir2, outcome, events) = run_split(&ckpt, &layout, &opts).unwrap();
    assert_eq!(dir2, dir);
    assert_eq!(outcome, SplitOutcome::Reused);
    assert_eq!(events, [SplitEvent::Reused]);
    assert_eq!(
        dir_files(&dir),
        before,
        "a reused split must not be touched"
    );
    // Nothing was verified again either (the record would have been rewritten).
    assert_eq!(fs::read(&record).unwrap(), record_before);
}

#[test]
fn split_is_redone_when_the_source_changes() {
    let spec = Spec {
        shards: 2,
        ..Spec::tiny()
    };
    let (_tmp, ckpt) = setup(&spec);
    let opts = SplitOptions::default();
    run_split(&ckpt, &layout(&spec), &opts).unwrap();
    let shard = ckpt.join("model-00002-of-00002.safetensors");

    // Only the mtime of one shard changes.
    set_mtime(&shard, mtime(&shard) + Duration::from_secs(10));
    assert_redone(&ckpt, &spec, &opts, "mtime");

    // Only the size changes (same tensors, extra header metadata), mtime restored.
    let t = mtime(&shard);
    let bytes = fs::read(&shard).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<_> = st.tensors();
    let mut md = std::collections::HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert("padding".to_string(), "x".repeat(100));
    let rewritten = safetensors::serialize(tensors, Some(md)).unwrap();
    assert_ne!(rewritten.len(), bytes.len());
    fs::write(&shard, rewritten).unwrap();
    set_mtime(&shard, t);
    assert_redone(&ckpt, &spec, &opts, "size");

    // config.json changes.
    let cfg = ckpt.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    c["rope_theta"] = 1e6.into();
    let t = mtime(&cfg);
    fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
    set_mtime(&cfg, t);
    assert_redone(&ckpt, &spec, &opts, "config");

    // New weights: the redone split carries the new bytes.
    let new_spec = Spec {
        seed: 99,
        ..spec.clone()
    };
    write_checkpoint(&ckpt, &new_spec);
    assert_redone(&ckpt, &new_spec, &opts, "weights");
    let m = Manifest::load(&opts.split_dir(&ckpt)).unwrap();
    let u = m.unit(rabbit_split::UnitKind::Layer(2)).unwrap();
    let bytes = fs::read(opts.split_dir(&ckpt).join(&u.file)).unwrap();
    let t = &u.tensors[3];
    let off = (u.data_offset + t.offset) as usize;
    assert_eq!(
        &bytes[off..off + t.len as usize],
        &source_tensor(&ckpt, &t.name).2[..]
    );
}

#[test]
fn split_is_redone_when_options_or_layout_change() {
    let spec = Spec::tiny();
    let (_tmp, ckpt) = setup(&spec);
    let opts = SplitOptions::default();
    run_split(&ckpt, &layout(&spec), &opts).unwrap();

    let wider = SplitOptions {
        alignment: 8192,
        ..SplitOptions::default()
    };
    assert_redone(&ckpt, &spec, &wider, "alignment");
    let m = Manifest::load(&wider.split_dir(&ckpt)).unwrap();
    assert!(m.units.iter().all(|u| u.data_offset % 8192 == 0));
    assert!(!is_current(&opts.split_dir(&ckpt), &ckpt, &layout(&spec), &opts).unwrap());

    // Layout change: the final norm unit is renamed; its old file must not survive.
    let mut l2 = layout(&spec);
    let norm = l2.units.iter_mut().find(|u| u.name == "norm").unwrap();
    norm.name = "final_norm".into();
    let dir = wider.split_dir(&ckpt);
    assert!(!is_current(&dir, &ckpt, &l2, &wider).unwrap());
    let (_, outcome, _) = run_split(&ckpt, &l2, &wider).unwrap();
    assert!(matches!(
        outcome,
        SplitOutcome::Written {
            units_resumed: 0,
            ..
        }
    ));
    assert!(dir.join("final_norm.safetensors").exists());
    assert!(
        !dir.join("norm.safetensors").exists(),
        "stale unit file left behind"
    );
    assert!(is_current(&dir, &ckpt, &l2, &wider).unwrap());
    assert!(!is_current(&dir, &ckpt, &layout(&spec), &wider).unwrap());

    // A subtler layout change (one more ignored suffix) is a different layout too.
    let mut l3 = l2.clone();
    l3.ignored_suffixes.push("some.other.buffer".into());
    assert!(!is_current(&dir, &ckpt, &l3, &wider).unwrap());
}

#[test]
fn missing_or_resized_unit_file_makes_split_stale() {
    let spec = Spec::tiny();
    let (_tmp, ckpt) = setup(&spec);
    let opts = SplitOptions::default();
    let l = layout(&spec);
    let (dir, _, _) = run_split(&ckpt, &l, &opts).unwrap();
    let reference = dir_files(&dir);
    fs::remove_file(dir.join("layer.001.safetensors")).unwrap();
    assert!(!is_current(&dir, &ckpt, &l, &opts).unwrap());
    let (_, outcome, _) = run_split(&ckpt, &l, &opts).unwrap();
    // Same plan: only the missing unit is rewritten, the rest are reused.
    assert_eq!(
        outcome,
        SplitOutcome::Written {
            bytes_written: reference["layer.001.safetensors"].len() as u64,
            units_written: 1,
            units_resumed: l.units.len() - 1
        }
    );
    assert_eq!(dir_files(&dir), reference);
}

#[test]
fn delete_original_removes_weights_only_after_verifying() {
    let spec = Spec {
        shards: 3,
        ..Spec::tiny()
    };
    let (_tmp, ckpt) = setup(&spec);
    let l = layout(&spec);
    let opts = SplitOptions {
        delete_original: true,
        ..SplitOptions::default()
    };
    let (dir, _, events) = run_split(&ckpt, &l, &opts).unwrap();
    let tail = &events[events.len() - 2..];
    assert_eq!(
        tail,
        [
            SplitEvent::Verified,
            SplitEvent::OriginalDeleted { files: 4 }
        ]
    );
    let left = file_names(&ckpt);
    assert_eq!(
        left,
        [
            "config.json",
            "generation_config.json",
            "rabbit-split",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let m = Manifest::load(&dir).unwrap();
    assert!(m.original_deleted);
    assert!(verify(&dir).unwrap().is_ok());

    // Later calls reuse the split instead of failing on the missing weights.
    for delete in [false, true] {
        let o = SplitOptions {
            delete_original: delete,
            ..SplitOptions::default()
        };
        assert!(is_current(&dir, &ckpt, &l, &o).unwrap());
        let (_, outcome, events) = run_split(&ckpt, &l, &o).unwrap();
        assert_eq!(outcome, SplitOutcome::Reused);
        assert_eq!(events, [SplitEvent::Reused]);
    }
    // A different layout cannot be served any more, and says why.
    let mut l2 = l.clone();
    l2.ignored_suffixes.push("x".into());
    let e = run_split(&ckpt, &l2, &SplitOptions::default()).unwrap_err();
    assert!(matches!(e, SplitError::SourceDeleted { .. }), "{e}");
    assert!(
        e.to_string().contains("different Qwen2ForCausalLM layout"),
        "{e}"
    );
    let reason = rabbit_split::stale_reason(&dir, &ckpt, &l2, &SplitOptions::default()).unwrap();
    assert!(reason.unwrap().contains("layout"));
    assert_eq!(
        rabbit_split::stale_reason(&dir, &ckpt, &l, &SplitOptions::default()).unwrap(),
        None
    );
}

/// Makes the verification record vouch for `file` as it is now, as if it had been damaged
/// without any change to its identity (a media error): only a full verification can see that.
fn forge_verified(dir: &Path, file: &str) {
    use std::os::unix::fs::MetadataExt;
    let m = Manifest::load(dir).unwrap();
    let u = m.units.iter().find(|u| u.file == file).unwrap();
    let md = fs::metadata(dir.join(file)).unwrap();
    let path = dir.join(rabbit_split::integrity::VERIFIED_FILE);
    let mut rec: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    rec["files"][file] = serde_json::json!({
        "checksum": u.checksum, "size": md.len(), "inode": md.ino(),
        "mtime": [md.mtime(), md.mtime_nsec()], "ctime": [md.ctime(), md.ctime_nsec()],
    });
    fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
}

fn flip_last_byte(p: &Path) {
    let mut b = fs::read(p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    fs::write(p, &b).unwrap();
}

#[test]
fn damage_found_by_reuse_is_repaired_from_the_source_before_the_originals_go() {
    let spec = Spec::tiny();
    let (_tmp, ckpt) = setup(&spec);
    let l = layout(&spec);
    let (dir, _, _) = run_split(&ckpt, &l, &SplitOptions::default()).unwrap();
    let reference = dir_files(&dir);
    let del = SplitOptions {
        delete_original: true,
        ..SplitOptions::default()
    };
    // Same size, so only the checksum (of a file changed since it was verified) sees it. Before,
    // reuse accepted the split and the deletion refused; now the damaged unit alone is redone.
    let victim = "layer.002.safetensors";
    flip_last_byte(&dir.join(victim));
    let reason = rabbit_split::stale_reason(&dir, &ckpt, &l, &SplitOptions::default())
        .unwrap()
        .expect("a damaged split is stale");
    assert!(
        reason.contains(victim) && reason.contains("checksum"),
        "{reason}"
    );
    let (_, outcome, events) = run_split(&ckpt, &l, &del).unwrap();
    assert_eq!(
        outcome,
        SplitOutcome::Written {
            bytes_written: reference[victim].len() as u64,
            units_written: 1,
            units_resumed: l.units.len() - 1
        }
    );
    assert_eq!(
        &events[events.len() - 2..],
        [
            SplitEvent::Verified,
            SplitEvent::OriginalDeleted { files: 1 }
        ]
    );
    let mut now = dir_files(&dir);
    let m = Manifest::parse(Path::new("m"), &now.remove("manifest.json").unwrap()).unwrap();
    assert!(m.original_deleted);
    let mut want = reference.clone();
    want.remove("manifest.json");
    assert_eq!(now, want, "repaired to the original bytes");
    assert!(!ckpt.join("model.safetensors").exists());
}

#[test]
fn delete_original_refuses_damage_that_only_a_full_verification_sees() {
    let spec = Spec::tiny();
    let (_tmp, ckpt) = setup(&spec);
    let l = layout(&spec);
    let (dir, _, _) = run_split(&ckpt, &l, &SplitOptions::default()).unwrap();
    let del = SplitOptions {
        delete_original: true,
        ..SplitOptions::default()
    };
    let victim = dir.join("layer.002.safetensors");
    flip_last_byte(&victim);
    forge_verified(&dir, "layer.002.safetensors");
    assert!(is_current(&dir, &ckpt, &l, &del).unwrap());
    let e = run_split(&ckpt, &l, &del).unwrap_err();
    match &e {
        SplitError::Damaged { damaged, .. } => {
            assert_eq!(damaged.len(), 1);
            assert_eq!(damaged[0].file, victim);
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("layer.002.safetensors"), "{e}");
    assert!(ckpt.join("model.safetensors").exists());
    assert!(!Manifest::load(&dir).unwrap().original_deleted);
    // That verification dropped the file from the record: the next run repairs it, as the
    // message of `rabbit split --verify` promises, and then deletes the weights.
    assert!(!is_current(&dir, &ckpt, &l, &del).unwrap());
    let (_, outcome, events) = run_split(&ckpt, &l, &del).unwrap();
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
    assert_eq!(
        events.last(),
        Some(&SplitEvent::OriginalDeleted { files: 1 })
    );
    assert!(verify(&dir).unwrap().is_ok());
    assert!(!ckpt.join("model.safetensors").exists());
    assert!(ckpt.join("config.json").exists());
    assert!(Manifest::load(&dir).unwrap().original_deleted);
}

#[test]
fn weights_removed_by_hand_are_not_silently_replaced_by_the_split() {
    let spec = Spec::tiny();
    let (_tmp, ckpt) = setup(&spec);
    let l = layout(&spec);
    let opts = SplitOptions::default();
    let (dir, _, _) = run_split(&ckpt, &l, &opts).unwrap();
    fs::remove_file(ckpt.join("model.safetensors")).unwrap();
    assert!(!is_current(&dir, &ckpt, &l, &opts).unwrap());
    let e = run_split(&ckpt, &l, &opts).unwrap_err();
    assert!(matches!(e, SplitError::MissingWeights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn resume_rewrites_a_same_size_unit_file_that_belongs_to_another_source() {
    let spec = Spec::tiny();
    let (tmp, ckpt) = setup(&spec);
    let other = tmp.path().join("other");
    write_checkpoint(
        &other,
        &Spec {
            seed: 3,
            ..spec.clone()
        },
    );
    // Files written within one timestamp tick (a few ms) would share the stat-based fingerprint;
    // real checkpoints written at different times do not.
    let w = other.join("model.safetensors");
    set_mtime(&w, mtime(&w) + Duration::from_secs(5));
    let l = layout(&spec);
    let opts = SplitOptions::default();
    let (dir, _, _) = run_split(&ckpt, &l, &opts).unwrap();
    let (other_dir, _, _) = run_split(&other, &l, &opts).unwrap();
    let reference = dir_files(&dir);

    // Simulate an interrupted split whose directory holds a foreign, complete-looking unit of
    // exactly the planned size: only its header (fingerprint) tells it apart.
    fs::remove_file(dir.join("manifest.json")).unwrap();
    let victim = "layer.001.safetensors";
    fs::copy(other_dir.join(victim), dir.join(victim)).unwrap();
    assert_eq!(
        fs::read(dir.join(victim)).unwrap().len(),
        reference[victim].len()
    );
    assert_ne!(fs::read(dir.join(victim)).unwrap(), reference[victim]);

    let (_, outcome, _) = run_split(&ckpt, &l, &opts).unwrap();
    assert_eq!(
        outcome,
        SplitOutcome::Written {
            bytes_written: reference[victim].len() as u64,
            units_written: 1,
            units_resumed: l.units.len() - 1
        }
    );
    assert_eq!(dir_files(&dir), reference);
}
