//! Helpers shared by the end-to-end tests of the `rabbit` binary.
//!
//! Each file under `tests/` is its own crate and uses only some of these helpers, so the ones a
//! given test binary leaves unused would otherwise each warn there.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `rabbit` binary under test, with no LD_LIBRARY_PATH (it must find libtorch on its own).
pub fn rabbit() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rabbit"));
    c.env_remove("LD_LIBRARY_PATH").env("RUST_LOG", "warn");
    c
}

/// Runs a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("rabbit runs")
}

/// Runs a command, killing it (and failing) if it has not finished within a minute: for the
/// commands that take a second, where a minute means it hangs.
pub fn run_watched(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rabbit runs");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} hangs; stderr: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Whatever the exit status: no panic message, no backtrace hint, no panic exit code (101).
pub fn no_panic(o: &Output) {
    let err = stderr(o);
    assert!(
        !err.contains("panicked")
            && !err.contains("RUST_BACKTRACE")
            && o.status.code() != Some(101),
        "panic: {err}"
    );
}

/// A failing command: non-zero exit, every `needle` in its stderr, and never a panic.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    no_panic(o);
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure; stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention `{n}`: {err}");
    }
}

/// The JSON object on the last line of stdout.
pub fn last_json_line(o: &Output) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no stdout; stderr: {}", stderr(o)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// A checkpoint of the repository's fixtures (`tests/fixtures/<case>`).
pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
}

/// `rabbit generate` on the `qwen2_tied_f32` fixture, on the CPU unless `extra` names a device.
pub fn generate_fixture(extra: &[&str], split: &Path) -> Output {
    let device: &[&str] = if extra.contains(&"--device") {
        &[]
    } else {
        &["--device", "cpu"]
    };
    run(rabbit()
        .arg("generate")
        .args(device)
        .arg("--model")
        .arg(fixture("qwen2_tied_f32"))
        .arg("--split-dir")
        .arg(split)
        .args(extra))
}

/// `rabbit synth ARGS --out OUT`, to run with [`run`] or [`run_watched`].
pub fn synth_cmd(out: &Path, args: &[&str]) -> Command {
    let mut c = rabbit();
    c.arg("synth").args(args).arg("--out").arg(out);
    c
}

/// Writes a synthetic checkpoint: `rabbit synth ARGS --out OUT`, which must succeed.
pub fn synth(out: &Path, args: &[&str]) {
    assert_ok(&run(&mut synth_cmd(out, args)));
}

/// The tiny synthetic qwen2 checkpoint (with its tokenizer) of the given seed.
pub fn tiny_model(dir: &Path, seed: u32) {
    tiny_model_with(dir, seed, &[]);
}

/// [`tiny_model`] with more `rabbit synth` flags (e.g. `--max-position N`).
pub fn tiny_model_with(dir: &Path, seed: u32, extra: &[&str]) {
    let seed = seed.to_string();
    let mut args = vec!["--arch", "qwen2", "--preset", "tiny", "--seed", &seed];
    args.extend_from_slice(extra);
    synth(dir, &args);
}

/// Flips one byte near the end of a file (in its data, past any header).
pub fn flip_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x55;
    std::fs::write(p, b).unwrap();
}

/// A fixture's `expected.json`.
pub fn expected(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(case).join("expected.json")).unwrap())
        .unwrap()
}

/// Token ids of a JSON array as `--input-ids` takes them.
pub fn ids_csv(v: &Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
