//! End-to-end: a damaged split is never run (repaired from the source, or a clear error when the
//! source is gone), a FIFO does not hang `generate`, the user's files are never overwritten
//! (`split --out`, `--dump-logits`), and `--delete-original` keeps other splits usable.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{
    assert_clean_failure, assert_ok, flip_byte, rabbit, run_watched, stderr, stdout, synth_cmd,
};

/// A tiny synthetic checkpoint in `dir/m`.
fn model(dir: &Path) -> PathBuf {
    let m = dir.join("m");
    assert_ok(&run_watched(&mut synth_cmd(
        &m,
        &["--arch", "qwen2", "--preset", "tiny", "--dtype", "f32"],
    )));
    m
}

fn split(model: &Path, extra: &[&str]) -> Output {
    run_watched(rabbit().arg("split").arg("--model").arg(model).args(extra))
}

fn generate(model: &Path, extra: &[&str]) -> Output {
    run_watched(
        rabbit()
            .args([
                "generate",
                "--device",
                "cpu",
                "--max-new-tokens",
                "2",
                "--input-ids",
                "1,2,3",
            ])
            .arg("--model")
            .arg(model)
            .args(extra),
    )
}

#[test]
fn a_damaged_split_is_repaired_from_the_source_not_run() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    assert_ok(&split(&m, &[]));
    let dir = m.join("rabbit-split");
    let victim = dir.join("layer.001.safetensors");
    let pristine = std::fs::read(&victim).unwrap();
    flip_byte(&victim);

    // `split --verify` names it, and its advice is now true: rerunning the split repairs it
    // (before: "split is current, reused", and generate ran on the damaged bytes, exit 0).
    let o = run_watched(rabbit().args(["split", "--verify"]).arg(&dir));
    assert_clean_failure(
        &o,
        &["layer.001.safetensors", "rerun `rabbit split --model"],
    );
    let o = split(&m, &[]);
    assert_ok(&o);
    assert!(stdout(&o).contains("wrote 1 files"), "{}", stdout(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), pristine);

    // generate repairs it on its own before running.
    flip_byte(&victim);
    let o = generate(&m, &[]);
    assert_ok(&o);
    assert!(stderr(&o).contains("splitting"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), pristine);
    assert_ok(&run_watched(rabbit().args(["split", "--verify"]).arg(&dir)));
}

#[test]
fn without_the_source_a_damaged_split_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    assert_ok(&split(&m, &["--delete-original"]));
    let dir = m.join("rabbit-split");
    assert_ok(&generate(&m, &[]));
    let pristine: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let restore = || {
        for (p, b) in &pristine {
            std::fs::write(p, b).unwrap();
        }
    };
    let (a, b) = (
        dir.join("layer.000.safetensors"),
        dir.join("layer.001.safetensors"),
    );

    // A flipped byte.
    flip_byte(&b);
    let o = generate(&m, &[]);
    assert_clean_failure(
        &o,
        &["layer.001.safetensors", "checksum mismatch", "deleted"],
    );
    restore();
    // Two layer files swapped.
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::write(&a, &bb).unwrap();
    std::fs::write(&b, &ba).unwrap();
    let o = generate(&m, &[]);
    assert_clean_failure(&o, &["layer.000.safetensors", "holds unit layer.001"]);
    restore();
    // Offsets edited in the manifest.
    let mpath = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let t = &mut v["units"][1]["tensors"][1];
    t["offset"] = (t["offset"].as_u64().unwrap() + 4).into();
    t["len"] = (t["len"].as_u64().unwrap() - 4).into();
    std::fs::write(&mpath, v.to_string()).unwrap();
    let o = generate(&m, &[]);
    assert_clean_failure(&o, &["layer.000.safetensors", "differs from the manifest"]);
    restore();
    assert_ok(&generate(&m, &["--verify-split"]));
}

/// Weights moved away by hand (not by `--delete-original`) from a split that then got damaged:
/// the error names the damaged file and says to put the weights back.
#[test]
fn weights_moved_away_from_a_damaged_split_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    // A split made on first use; later runs use it without asking.
    assert_ok(&generate(&m, &["--split"]));
    std::fs::rename(m.join("model.safetensors"), tmp.path().join("saved")).unwrap();
    flip_byte(&m.join("rabbit-split").join("layer.001.safetensors"));
    let o = generate(&m, &[]);
    assert_clean_failure(
        &o,
        &[
            "layer.001.safetensors",
            "checksum mismatch",
            "put the original weights back",
        ],
    );
    std::fs::rename(tmp.path().join("saved"), m.join("model.safetensors")).unwrap();
    assert_ok(&generate(&m, &[]));
    assert_ok(&generate(&m, &["--verify-split"]));
}

#[test]
fn verify_split_reads_every_file() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    assert_ok(&split(&m, &["--delete-original"]));
    let dir = m.join("rabbit-split");
    // Damage that keeps the file's identity in the verification record (as a media error
    // would): the default open trusts the record, --verify-split does not.
    let victim = dir.join("norm.safetensors");
    flip_byte(&victim);
    let rec_path = dir.join("split.verified.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    let md = std::fs::metadata(&victim).unwrap();
    let entry = &mut rec["files"]["norm.safetensors"];
    entry["size"] = md.len().into();
    entry["inode"] = md.ino().into();
    entry["mtime"] = serde_json::json!([md.mtime(), md.mtime_nsec()]);
    entry["ctime"] = serde_json::json!([md.ctime(), md.ctime_nsec()]);
    entry["racy"] = false.into();
    std::fs::write(&rec_path, rec.to_string()).unwrap();
    assert_ok(&generate(&m, &[]));
    let o = generate(&m, &["--verify-split"]);
    assert_clean_failure(&o, &["norm.safetensors", "checksum mismatch"]);
}

#[test]
fn a_fifo_in_place_of_a_layer_file_does_not_hang_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let split_dir = tmp.path().join("s");
    let sd = ["--split-dir", split_dir.to_str().unwrap()];
    assert_ok(&generate(&m, &sd));
    let victim = split_dir.join("layer.000.safetensors");
    let pristine = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();
    let c = std::ffi::CString::new(victim.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Before: the manifest was deleted, then open() of the FIFO blocked for ever.
    let o = generate(&m, &sd);
    assert_ok(&o);
    assert_eq!(std::fs::read(&victim).unwrap(), pristine);
    assert!(split_dir.join("manifest.json").is_file());
}

#[test]
fn split_out_into_a_directory_of_other_files_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let out = tmp.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    let files: [(&str, &[u8]); 3] = [
        ("manifest.json", b"{\"mine\": 1}"),
        ("embed.safetensors", b"x"),
        ("layer.000.safetensors.tmp", b"draft"),
    ];
    for (n, b) in files {
        std::fs::write(out.join(n), b).unwrap();
    }
    for flag in [["split", "--out"], ["generate", "--split-dir"]] {
        let o = if flag[0] == "split" {
            split(&m, &[flag[1], out.to_str().unwrap()])
        } else {
            generate(&m, &[flag[1], out.to_str().unwrap()])
        };
        assert_clean_failure(&o, &["refusing to write the split", out.to_str().unwrap()]);
        for (n, b) in files {
            assert_eq!(std::fs::read(out.join(n)).unwrap(), b, "{flag:?}: {n}");
        }
    }
}

#[test]
fn dump_logits_never_touches_other_files_and_leaves_no_temporary() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let mine = tmp.path().join("run.tmp");
    std::fs::write(&mine, b"precious").unwrap();
    let dump = tmp.path().join("run.st");
    // Before: written as run.tmp, then renamed: the user's run.tmp was gone.
    assert_ok(&generate(&m, &["--dump-logits", dump.to_str().unwrap()]));
    assert_eq!(std::fs::read(&mine).unwrap(), b"precious");
    let bytes = std::fs::read(&dump).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits.0").unwrap().shape()[0], 2);
    // A destination that cannot be written (a directory): clear error, no temporary left.
    let bad = tmp.path().join("adir");
    std::fs::create_dir(&bad).unwrap();
    let o = generate(&m, &["--dump-logits", bad.to_str().unwrap()]);
    assert_clean_failure(&o, &["adir"]);
    let stray: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") && n != "run.tmp")
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn delete_original_keeps_a_compressed_split_of_the_same_weights_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    assert_ok(&split(&m, &["--compression", "4bit"]));
    assert_ok(&split(&m, &["--delete-original"]));
    assert!(!m.join("model.safetensors").exists());
    // Before: "no safetensors weights" while the 4-bit split verified fine.
    assert_ok(&generate(&m, &["--compression", "4bit"]));
    assert_ok(&generate(&m, &[]));
}
