//! `verify` names every damaged or missing unit file.

mod common;

use std::fs;

use common::*;
use rabbit_split::{verify, Manifest, SplitError, SplitOptions};

#[test]
fn verify_names_flipped_truncated_missing_and_mismatched_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    let spec = Spec {
        layers: 5,
        ..Spec::tiny()
    };
    write_checkpoint(&ckpt, &spec);
    let (dir, _, _) = run_split(&ckpt, &layout(&spec), &SplitOptions::default()).unwrap();
    let m = Manifest::load(&dir).unwrap();
    let clean = verify(&dir).unwrap();
    assert!(clean.is_ok());
    assert_eq!(clean.files_checked, 8);

    // 1. One data byte flipped.
    let flip = dir.join("layer.001.safetensors");
    let mut b = fs::read(&flip).unwrap();
    let u = m.unit(rabbit_split::UnitKind::Layer(1)).unwrap();
    b[u.data_offset as usize + 17] ^= 0x80;
    fs::write(&flip, &b).unwrap();
    // 2. Truncated by one byte.
    let trunc = dir.join("layer.002.safetensors");
    let b = fs::read(&trunc).unwrap();
    fs::write(&trunc, &b[..b.len() - 1]).unwrap();
    // 3. Deleted.
    let gone = dir.join("norm.safetensors");
    fs::remove_file(&gone).unwrap();
    // 4. A byte of the JSON header changed (a tensor renamed).
    let hdr = dir.join("layer.003.safetensors");
    let mut b = fs::read(&hdr).unwrap();
    let pos = b.windows(7).position(|w| w == b"o_proj.").unwrap();
    b[pos] = b'x';
    fs::write(&hdr, &b).unwrap();
    // 5. Another split's unit (same size, same tensors, different bytes) swapped in.
    let other_ckpt = tmp.path().join("other");
    write_checkpoint(
        &other_ckpt,
        &Spec {
            seed: 5,
            ..spec.clone()
        },
    );
    let (other, _, _) = run_split(&other_ckpt, &layout(&spec), &SplitOptions::default()).unwrap();
    fs::copy(
        other.join("layer.004.safetensors"),
        dir.join("layer.004.safetensors"),
    )
    .unwrap();

    let r = verify(&dir).unwrap();
    assert!(!r.is_ok());
    assert_eq!(r.files_checked, 8);
    let named: Vec<_> = r.damaged.iter().map(|d| d.file.clone()).collect();
    assert_eq!(
        named,
        [
            flip,
            trunc,
            hdr,
            dir.join("layer.004.safetensors"),
            gone.clone()
        ]
    );
    assert!(
        r.damaged[0].problem.contains("checksum"),
        "{}",
        r.damaged[0]
    );
    assert!(r.damaged[1].problem.contains("size"), "{}", r.damaged[1]);
    assert!(r.damaged[2].problem.contains("differ"), "{}", r.damaged[2]);
    assert!(r.damaged[4].problem.contains("missing"), "{}", r.damaged[4]);
    let err = r.into_result(&dir).unwrap_err();
    let msg = err.to_string();
    for f in [
        "layer.001",
        "layer.002",
        "layer.003",
        "layer.004",
        "norm.safetensors",
    ] {
        assert!(msg.contains(f), "{msg}");
    }
    assert!(matches!(err, SplitError::Damaged { .. }));
}

#[test]
fn verify_without_manifest_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let e = verify(tmp.path()).unwrap_err();
    assert!(matches!(e, SplitError::MissingManifest { .. }), "{e}");
    assert!(e.to_string().contains(&*tmp.path().to_string_lossy()));
    fs::write(tmp.path().join("manifest.json"), b"[1,2]").unwrap();
    let e = verify(tmp.path()).unwrap_err();
    assert!(matches!(e, SplitError::BadManifest { .. }), "{e}");
}
