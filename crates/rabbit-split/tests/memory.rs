//! Peak memory while splitting stays bounded by the largest unit / the copy chunk, not by the
//! checkpoint size. Measured as the growth of VmHWM in a child process (this test binary
//! re-executed with the ignored `memory_child` test) so nothing else in the process interferes.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use rabbit_split::{Compression, Dtype, Manifest, SplitOptions, COPY_CHUNK};
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "RABBIT_SPLIT_MEMORY_CHILD";
const MIB: u64 = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct ChildCfg {
    ckpt: PathBuf,
    out: PathBuf,
    spec: Spec,
    result: PathBuf,
    #[serde(default)]
    compression: Option<Compression>,
}

fn vm_hwm_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Runs only when spawned by the tests below.
#[test]
#[ignore = "child process of the memory tests"]
fn memory_child() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cfg: ChildCfg = serde_json::from_str(&cfg).unwrap();
    let l = layout(&cfg.spec);
    let opts = SplitOptions {
        compression: cfg.compression,
        compress_embeddings: cfg.compression.is_some(),
        ..opts_to(&cfg.out)
    };
    // Reset the high-water mark to the current RSS (Linux >= 4.0); if that is not allowed the
    // baseline is the startup peak, which only makes the check stricter.
    let _ = fs::write("/proc/self/clear_refs", "5");
    let before = vm_hwm_bytes();
    rabbit_split::split(&cfg.ckpt, &l, &opts, &mut |_| {}).unwrap();
    let after = vm_hwm_bytes();
    fs::write(&cfg.result, format!("{before} {after}")).unwrap();
}

/// Splits `spec` in a child process and returns (peak RSS growth, largest unit file size,
/// checkpoint weight bytes).
fn measure(spec: Spec) -> (u64, u64, u64) {
    measure_with(spec, None)
}

fn measure_with(spec: Spec, compression: Option<Compression>) -> (u64, u64, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let cfg = ChildCfg {
        ckpt: ckpt.clone(),
        out: tmp.path().join("out"),
        result: tmp.path().join("result"),
        spec: spec.clone(),
        compression,
    };
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "memory_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, serde_json::to_string(&cfg).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let r = fs::read_to_string(&cfg.result).unwrap();
    let v: Vec<u64> = r.split(' ').map(|x| x.parse().unwrap()).collect();
    let m = Manifest::load(&cfg.out).unwrap();
    assert!(rabbit_split::verify(&cfg.out).unwrap().is_ok());
    let largest = m.units.iter().map(|u| u.size).max().unwrap();
    (v[1].saturating_sub(v[0]), largest, spec.total_bytes())
}

#[test]
fn peak_memory_is_bounded_by_one_layer_not_the_checkpoint() {
    // 24 layers of ~1.9 MiB, small embedding: ~46 MiB of weights.
    let spec = Spec {
        layers: 24,
        hidden: 256,
        kv: 64,
        inter: 1024,
        vocab: 512,
        dtype: Dtype::BF16,
        ..Spec::tiny()
    };
    let (growth, largest, total) = measure(spec);
    let bound = 2 * largest + 8 * MIB;
    eprintln!("peak growth {growth} B, largest unit {largest} B, checkpoint {total} B");
    assert!(total > 3 * bound, "fixture too small to prove anything");
    assert!(
        growth < bound,
        "peak RSS grew by {growth} bytes, bound {bound}"
    );
}

#[test]
fn one_huge_tensor_is_copied_in_bounded_chunks() {
    // A 48 MiB embedding: memory must stay near one copy chunk, not the tensor size.
    let spec = Spec {
        layers: 1,
        hidden: 256,
        kv: 64,
        inter: 256,
        vocab: 96 * 1024,
        tied: true,
        ..Spec::tiny()
    };
    let (growth, largest, _) = measure(spec);
    let bound = COPY_CHUNK as u64 + 8 * MIB;
    eprintln!("peak growth {growth} B, largest unit {largest} B");
    assert!(largest > 2 * bound, "fixture too small to prove anything");
    assert!(
        growth < bound,
        "peak RSS grew by {growth} bytes, bound {bound}"
    );
}

#[test]
fn compressed_split_memory_is_bounded_by_one_layer_too() {
    // As above, quantizing every matrix (embedding included) to NF4: memory stays near one
    // (compressed) layer plus the quantizer's bounded chunk buffers.
    let spec = Spec {
        layers: 24,
        hidden: 256,
        kv: 64,
        inter: 1024,
        vocab: 512,
        dtype: Dtype::BF16,
        ..Spec::tiny()
    };
    let (growth, largest, total) = measure_with(spec, Some(Compression::Nf4));
    let bound = 2 * largest + 8 * MIB;
    eprintln!("nf4: peak growth {growth} B, largest unit {largest} B, checkpoint {total} B");
    assert!(total > 3 * bound, "fixture too small to prove anything");
    assert!(
        growth < bound,
        "peak RSS grew by {growth} bytes, bound {bound}"
    );
}
