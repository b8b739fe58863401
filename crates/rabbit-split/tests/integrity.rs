//! The integrity checks run wherever a split is opened or reused: cheap header checks always,
//! checksums of files changed since they were last verified, and a full check on request.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use rabbit_split::integrity::{check, Checksums, VERIFIED_FILE};
use rabbit_split::{Manifest, SplitOptions, UnitKind};

/// A split whose files count as settled (written more than the timestamp granularity ago).
fn split_of(spec: &Spec) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, spec);
    rabbit_split::testing::skew_clock(60);
    let (dir, _, _) = run_split(&ckpt, &layout(spec), &SplitOptions::default()).unwrap();
    rabbit_split::testing::skew_clock(0);
    (tmp, ckpt, dir)
}

fn spec() -> Spec {
    Spec {
        layers: 4,
        ..Spec::tiny()
    }
}

/// The one damaged file and its problem, from a check of `dir`.
fn only_damage(dir: &Path, checksums: Checksums) -> (PathBuf, String) {
    let m = Manifest::load(dir).unwrap();
    let r = check(dir, &m, checksums);
    assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
    (r.damaged[0].file.clone(), r.damaged[0].problem.clone())
}

#[test]
fn a_fresh_split_is_not_read_again_and_a_full_check_reads_everything() {
    let (_t, _ckpt, dir) = split_of(&spec());
    let m = Manifest::load(&dir).unwrap();
    let total: u64 = m.units.iter().map(|u| u.size).sum();
    // The splitter recorded what it wrote: opening costs header reads only.
    let r = check(&dir, &m, Checksums::Changed);
    assert!(r.is_ok(), "{:?}", r.damaged);
    assert_eq!(
        (r.files_checked, r.files_hashed, r.bytes_hashed),
        (m.units.len(), 0, 0)
    );
    let r = check(&dir, &m, Checksums::All);
    assert!(r.is_ok());
    assert_eq!((r.files_hashed, r.bytes_hashed), (m.units.len(), total));
    // Without a record (a split made by an older version, copied elsewhere): hashed once,
    // recorded, then trusted.
    fs::remove_file(dir.join(VERIFIED_FILE)).unwrap();
    rabbit_split::testing::skew_clock(60);
    assert_eq!(check(&dir, &m, Checksums::Changed).bytes_hashed, total);
    assert_eq!(check(&dir, &m, Checksums::Changed).bytes_hashed, 0);
    rabbit_split::testing::skew_clock(0);
    // A file replaced by an identical copy is a new inode: hashed again, and fine. Changed
    // within the timestamp granularity of its verification, it is hashed again next time too
    // (a write in the same tick would not show), until it has settled.
    let p = dir.join("layer.001.safetensors");
    let bytes = fs::read(&p).unwrap();
    fs::remove_file(&p).unwrap();
    fs::write(&p, &bytes).unwrap();
    for _ in 0..2 {
        let r = check(&dir, &m, Checksums::Changed);
        assert!(r.is_ok());
        assert_eq!((r.files_hashed, r.bytes_hashed), (1, bytes.len() as u64));
    }
    rabbit_split::testing::skew_clock(60);
    assert_eq!(check(&dir, &m, Checksums::Changed).files_hashed, 1);
    assert_eq!(check(&dir, &m, Checksums::Changed).files_hashed, 0);
    rabbit_split::testing::skew_clock(0);
}

#[test]
fn a_flipped_data_byte_is_caught_once_the_file_changed() {
    let (_t, _ckpt, dir) = split_of(&spec());
    let m = Manifest::load(&dir).unwrap();
    let u = m.unit(UnitKind::Layer(2)).unwrap();
    let p = dir.join(&u.file);
    let mut b = fs::read(&p).unwrap();
    b[u.data_offset as usize + 5] ^= 0x10;
    fs::write(&p, &b).unwrap();
    let (file, problem) = only_damage(&dir, Checksums::Changed);
    assert_eq!(file, p);
    assert!(problem.contains("checksum mismatch"), "{problem}");
    // Damage is never recorded as verified: it is seen again next time.
    let (_, again) = only_damage(&dir, Checksums::Changed);
    assert_eq!(again, problem);
}

#[test]
fn files_of_another_model_swapped_files_and_edited_offsets_fail_the_cheap_checks() {
    let spec = spec();
    let (tmp, _ckpt, dir) = split_of(&spec);
    let other_ckpt = tmp.path().join("other");
    write_checkpoint(
        &other_ckpt,
        &Spec {
            seed: 9,
            ..spec.clone()
        },
    );
    // Checkpoints written within one timestamp tick share a stat-based fingerprint; real ones
    // written at different times do not.
    let w = fs::File::options()
        .write(true)
        .open(other_ckpt.join("model.safetensors"))
        .unwrap();
    let t = w.metadata().unwrap().modified().unwrap();
    w.set_modified(t + std::time::Duration::from_secs(5))
        .unwrap();
    drop(w);
    let (other, _, _) = run_split(&other_ckpt, &layout(&spec), &SplitOptions::default()).unwrap();
    let pristine = dir_files(&dir);
    let restore = || {
        for (name, bytes) in &pristine {
            fs::write(dir.join(name), bytes).unwrap();
        }
    };
    let m = Manifest::load(&dir).unwrap();

    // The same unit of another model: same size, same tensors, other source.
    fs::copy(
        other.join("layer.001.safetensors"),
        dir.join("layer.001.safetensors"),
    )
    .unwrap();
    let (file, problem) = only_damage(&dir, Checksums::Changed);
    assert!(file.ends_with("layer.001.safetensors"));
    assert!(problem.contains("another model"), "{problem}");
    restore();

    // Two layer files swapped (same sizes).
    let (a, b) = (
        dir.join("layer.001.safetensors"),
        dir.join("layer.002.safetensors"),
    );
    fs::rename(&a, dir.join("x")).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(dir.join("x"), &b).unwrap();
    let r = check(&dir, &m, Checksums::Changed);
    let named: Vec<&Path> = r.damaged.iter().map(|d| d.file.as_path()).collect();
    assert_eq!(named, [a.as_path(), b.as_path()]);
    assert!(
        r.damaged[0].problem.contains("holds unit layer.002"),
        "{}",
        r.damaged[0]
    );
    restore();

    // Offsets edited in the manifest (still inside the data region, so the manifest parses).
    let mut edited = m.clone();
    let t = &mut edited.units[3].tensors[0];
    t.offset += 2;
    t.len -= 2;
    fs::write(dir.join("manifest.json"), edited.to_json()).unwrap();
    let edited = Manifest::load(&dir).unwrap();
    let r = check(&dir, &edited, Checksums::Changed);
    assert_eq!(r.damaged.len(), 1, "{:?}", r.damaged);
    assert!(
        r.damaged[0].problem.contains("differs from the manifest"),
        "{}",
        r.damaged[0]
    );
    restore();
    assert!(check(&dir, &m, Checksums::Changed).is_ok());
}

#[test]
fn a_fifo_or_a_directory_in_place_of_a_unit_is_named_without_hanging() {
    let (_t, _ckpt, dir) = split_of(&spec());
    let p = dir.join("layer.000.safetensors");
    fs::remove_file(&p).unwrap();
    mkfifo(&p);
    let d = dir.clone();
    let (file, problem) = within_a_minute("checking a split with a FIFO", move || {
        only_damage(&d, Checksums::All)
    });
    assert_eq!(file, p);
    assert!(problem.contains("FIFO"), "{problem}");
    fs::remove_file(&p).unwrap();
    fs::create_dir(&p).unwrap();
    let (_, problem) = only_damage(&dir, Checksums::Changed);
    assert!(problem.contains("directory"), "{problem}");
}
