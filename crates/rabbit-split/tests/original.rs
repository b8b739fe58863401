//! `delete_original` and the splits that are the only copy of their model: never destroyed by a
//! split of other weights into their directory, a deletion that stopped partway is finished, and
//! a refused deletion leaves the new split usable (or, when the refusal is foreseeable, nothing
//! written at all).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use rabbit_split::{
    is_current, verify, Compression, Manifest, SplitError, SplitEvent, SplitOptions, SplitOutcome,
};

fn fixture(spec: &Spec) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, spec);
    (tmp, ckpt)
}

fn deleting() -> SplitOptions {
    SplitOptions {
        delete_original: true,
        ..SplitOptions::default()
    }
}

fn flip_last_byte(p: &Path) {
    let mut b = fs::read(p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    fs::write(p, &b).unwrap();
}

/// Makes the verification record vouch for `file` as it is now (damage without any change to
/// its identity, as a media error): only a full verification sees it.
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

#[test]
fn a_split_that_is_the_only_copy_is_not_destroyed_by_splitting_other_weights_into_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let spec_a = Spec::tiny();
    // Another model: other data and another layout, so its plan differs in every way.
    let spec_b = Spec {
        layers: 2,
        seed: 7,
        ..Spec::tiny()
    };
    write_checkpoint(&a, &spec_a);
    write_checkpoint(&b, &spec_b);
    let shared = tmp.path().join("s").join("x");
    let to_shared = |delete_original| SplitOptions {
        delete_original,
        ..opts_to(&shared)
    };
    run_split(&a, &layout(&spec_a), &to_shared(true)).unwrap();
    assert!(!a.join("model.safetensors").exists());
    let before = dir_files(&shared);

    for delete in [false, true] {
        let e = run_split(&b, &layout(&spec_b), &to_shared(delete)).unwrap_err();
        assert!(matches!(e, SplitError::OnlyCopy { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&b.display().to_string())
                && msg.contains(&shared.display().to_string())
                && msg.contains("only copy")
                && msg.contains("another directory"),
            "{msg}"
        );
        assert_eq!(dir_files(&shared), before, "A's split was touched");
        assert!(b.join("model.safetensors").exists());
    }
    // A's split is intact and still serves A.
    assert!(verify(&shared).unwrap().is_ok());
    let (_, outcome, _) = run_split(&a, &layout(&spec_a), &to_shared(false)).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);
    // Elsewhere B splits as usual.
    run_split(&b, &layout(&spec_b), &opts_to(&tmp.path().join("b-split"))).unwrap();
}

#[test]
fn a_deletion_that_stopped_partway_is_finished_by_the_next_run() {
    let spec = Spec {
        shards: 3,
        ..Spec::tiny()
    };
    let (_t, ckpt) = fixture(&spec);
    let l = layout(&spec);
    let (dir, _, _) = run_split(&ckpt, &l, &SplitOptions::default()).unwrap();
    // What a deletion interrupted after its first shard leaves: the split marked the only copy,
    // one shard gone, the others and the index still there.
    let mut m = Manifest::load(&dir).unwrap();
    m.original_deleted = true;
    fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
    fs::remove_file(ckpt.join("model-00001-of-00003.safetensors")).unwrap();
    assert!(is_current(&dir, &ckpt, &l, &deleting()).unwrap());

    let (_, outcome, events) = run_split(&ckpt, &l, &deleting()).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);
    assert_eq!(
        events,
        [SplitEvent::Reused, SplitEvent::OriginalDeleted { files: 3 }]
    );
    assert_eq!(
        file_names(&ckpt),
        [
            "config.json",
            "generation_config.json",
            "rabbit-split",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert!(verify(&dir).unwrap().is_ok());
    // And it keeps being reused, with or without delete_original.
    for o in [SplitOptions::default(), deleting()] {
        let (_, outcome, events) = run_split(&ckpt, &l, &o).unwrap();
        assert_eq!(outcome, SplitOutcome::Reused);
        assert_eq!(events, [SplitEvent::Reused]);
    }
}

/// A 4-bit split of `ckpt` whose `layer.001` is damaged; `forged`: in a way only a full
/// verification sees.
fn damaged_dependent(ckpt: &Path, spec: &Spec, forged: bool) -> PathBuf {
    let nf4 = SplitOptions {
        compression: Some(Compression::Nf4),
        ..SplitOptions::default()
    };
    let (dir, _, _) = run_split(ckpt, &layout(spec), &nf4).unwrap();
    flip_last_byte(&dir.join("layer.001.safetensors"));
    if forged {
        forge_verified(&dir, "layer.001.safetensors");
    }
    dir
}

#[test]
fn a_damaged_dependent_split_is_refused_before_anything_is_written() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let l = layout(&spec);
    damaged_dependent(&ckpt, &spec, false);
    let e = run_split(&ckpt, &l, &deleting()).unwrap_err();
    assert!(matches!(e, SplitError::DependentSplit { .. }), "{e:?}");
    assert!(e.to_string().contains("layer.001"), "{e}");
    assert!(
        !deleting().split_dir(&ckpt).exists(),
        "the split was written although the deletion was bound to refuse"
    );
    assert!(ckpt.join("model.safetensors").exists());
}

#[test]
fn a_deletion_refused_at_the_end_leaves_the_new_split_complete_and_usable() {
    let spec = Spec::tiny();
    let (_t, ckpt) = fixture(&spec);
    let l = layout(&spec);
    // Damage only the full verification before the deletion sees: the early check passes.
    damaged_dependent(&ckpt, &spec, true);
    let e = run_split(&ckpt, &l, &deleting()).unwrap_err();
    assert!(matches!(e, SplitError::DependentSplit { .. }), "{e:?}");
    assert!(e.to_string().contains("layer.001"), "{e}");
    assert!(ckpt.join("model.safetensors").exists());

    let dir = deleting().split_dir(&ckpt);
    let m = Manifest::load(&dir).unwrap();
    assert!(!m.original_deleted);
    assert!(verify(&dir).unwrap().is_ok());
    let plain = SplitOptions::default();
    assert!(is_current(&dir, &ckpt, &l, &plain).unwrap());
    let (_, outcome, events) = run_split(&ckpt, &l, &plain).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);
    assert_eq!(events, [SplitEvent::Reused]);
}
