//! Streaming in place: every unit's region, assembled from its extents of the original shards,
//! holds each tensor's exact bytes at the offset its entry says; extents are aligned, few
//! (adjacent tensors are one read) and span shards where the unit does; nothing is written; a
//! checkpoint a split would refuse is refused the same way.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use rabbit_split::in_place::REGION_ALIGN;
use rabbit_split::layout::UnitKind;
use rabbit_split::{plan_in_place, Dtype, InPlace, SplitError, UnitRegion};

/// The region of a unit as the reader builds it: each extent read at its region position.
fn assemble(region: &UnitRegion) -> Vec<u8> {
    let mut buf = vec![0u8; region.len as usize];
    for e in &region.extents {
        let f = fs::File::open(&e.file).unwrap();
        let at = e.region_offset as usize;
        f.read_exact_at(&mut buf[at..at + e.len as usize], e.file_offset)
            .unwrap();
    }
    buf
}

fn check_regions(ckpt: &Path, ip: &InPlace) {
    assert_eq!(ip.manifest.units.len(), ip.regions.len());
    for (u, r) in ip.manifest.units.iter().zip(&ip.regions) {
        let mut prev_end = 0;
        for e in &r.extents {
            assert_eq!(e.file_offset % REGION_ALIGN, 0, "{}: {e:?}", u.name);
            assert_eq!(e.region_offset % REGION_ALIGN, 0, "{}: {e:?}", u.name);
            assert!(e.region_offset >= prev_end, "{}: extents overlap", u.name);
            prev_end = e.region_offset + e.len;
        }
        assert_eq!(r.len, prev_end);
        assert_eq!(u.data_len, r.len);
        let region = assemble(r);
        for t in &u.tensors {
            let (dtype, shape, want) = source_tensor(ckpt, &t.name);
            assert_eq!((t.dtype, &t.shape), (dtype, &shape), "{}", t.name);
            let got = &region[t.offset as usize..(t.offset + t.len) as usize];
            assert!(got == want.as_slice(), "{}: bytes differ", t.name);
            let (e, _) = r.locate(t.offset, t.len).expect("inside one extent");
            assert!(e.file.exists());
        }
    }
}

#[test]
fn regions_hold_every_tensor_exactly_single_file_and_sharded() {
    for shards in [1, 3] {
        for norm_dtype in [Dtype::BF16, Dtype::F32] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = Spec {
                shards,
                norm_dtype,
                layers: 4,
                ..Spec::tiny()
            };
            write_checkpoint(tmp.path(), &spec);
            let before = dir_files(tmp.path());
            let ip = plan_in_place(tmp.path(), &layout(&spec)).unwrap();
            check_regions(tmp.path(), &ip);
            // Nothing written, nothing changed.
            assert_eq!(dir_files(tmp.path()), before);
            assert_eq!(
                fs::read_dir(tmp.path()).unwrap().count(),
                before.len(),
                "no directory appeared"
            );
            // Tensors of a layer lie side by side in one file: one read, or two when the norms
            // are of another dtype (safetensors groups tensors by dtype).
            if shards == 1 {
                let most = if norm_dtype == spec.dtype { 1 } else { 2 };
                for (u, r) in ip.manifest.units.iter().zip(&ip.regions) {
                    if matches!(u.kind, UnitKind::Layer(_)) {
                        assert!(r.extents.len() <= most, "{}: {:?}", u.name, r.extents);
                    }
                }
            } else {
                // Some unit spans two shards.
                assert!(ip
                    .regions
                    .iter()
                    .any(|r| { r.extents.iter().any(|e| e.file != r.extents[0].file) }));
            }
            let tensor_bytes: u64 = ip
                .manifest
                .units
                .iter()
                .flat_map(|u| &u.tensors)
                .map(|t| t.len)
                .sum();
            assert!(ip.weight_bytes >= tensor_bytes);
            // Slack: at most one page before each extent and one between merged tensors.
            for (u, r) in ip.manifest.units.iter().zip(&ip.regions) {
                for e in &r.extents {
                    let inside: Vec<u64> = u
                        .tensors
                        .iter()
                        .filter(|t| {
                            t.offset >= e.region_offset
                                && t.offset + t.len <= e.region_offset + e.len
                        })
                        .map(|t| t.len)
                        .collect();
                    let slack = e.len - inside.iter().sum::<u64>();
                    assert!(
                        slack <= inside.len() as u64 * REGION_ALIGN,
                        "{}: {e:?} reads {slack} bytes beyond its tensors",
                        u.name
                    );
                }
            }
        }
    }
}

#[test]
fn a_checkpoint_the_split_refuses_is_refused_in_place_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    write_checkpoint(tmp.path(), &spec);
    let mut l = layout(&spec);
    l.units[1]
        .required
        .push("model.layers.0.mlp.extra.weight".into());
    let e = plan_in_place(tmp.path(), &l).unwrap_err();
    assert!(
        matches!(&e, SplitError::MissingTensor { tensor, .. } if tensor == "model.layers.0.mlp.extra.weight"),
        "{e}"
    );
    // A shard cut short: named, before anything runs.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(tmp.path().join("model.safetensors"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 10).unwrap();
    let e = plan_in_place(tmp.path(), &layout(&spec)).unwrap_err();
    assert!(matches!(e, SplitError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn locate_finds_ranges_inside_one_extent_only() {
    let r = UnitRegion {
        extents: vec![
            rabbit_split::Extent {
                file: "a".into(),
                file_offset: 8192,
                len: 100,
                region_offset: 0,
            },
            rabbit_split::Extent {
                file: "b".into(),
                file_offset: 0,
                len: 50,
                region_offset: 4096,
            },
        ],
        len: 4146,
    };
    assert_eq!(
        r.locate(10, 90).map(|(e, at)| (&e.file, at)),
        Some((&"a".into(), 8202))
    );
    assert_eq!(
        r.locate(4096, 50).map(|(e, at)| (&e.file, at)),
        Some((&"b".into(), 0))
    );
    assert!(r.locate(10, 91).is_none(), "past the first extent");
    assert!(r.locate(200, 10).is_none(), "in the gap");
    assert!(r.locate(4100, 50).is_none(), "past the end");
    assert!(r.locate(u64::MAX, 2).is_none(), "overflow");
    assert_eq!(r.bytes_read(), 150);
}
