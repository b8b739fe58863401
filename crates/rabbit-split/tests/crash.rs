//! kill -9 at several points of a split, then rerun: the result is byte-identical to an
//! uninterrupted split. The split runs in a child process (this test binary re-executed with the
//! ignored `crash_child` test), which the parent SIGKILLs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rabbit_split::{SplitEvent, SplitOutcome};
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "RABBIT_SPLIT_CRASH_CHILD";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChildCfg {
    ckpt: PathBuf,
    out: PathBuf,
    spec: Spec,
    /// Sleep after the plan is written (ms).
    pause_planned: u64,
    /// Sleep after each unit but the last (ms).
    pause_unit: u64,
    /// Sleep after the last unit, before the manifest (ms).
    pause_last: u64,
}

/// Runs only when spawned by the parent tests below.
#[test]
#[ignore = "child process of the crash tests"]
fn crash_child() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cfg: ChildCfg = serde_json::from_str(&cfg).unwrap();
    let sleep = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
    rabbit_split::split(
        &cfg.ckpt,
        &layout(&cfg.spec),
        &opts_to(&cfg.out),
        &mut |e| match e {
            SplitEvent::Planned { .. } => sleep(cfg.pause_planned),
            SplitEvent::UnitDone { index, total, .. } if index + 1 == *total => {
                sleep(cfg.pause_last)
            }
            SplitEvent::UnitDone { .. } => sleep(cfg.pause_unit),
            _ => {}
        },
    )
    .unwrap();
}

fn spawn(cfg: &ChildCfg) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, serde_json::to_string(cfg).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills the child if the parent test panics, so no orphan keeps writing.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGKILLs the child as soon as the out dir satisfies `cond`; returns the files left.
fn kill_when(
    child: Child,
    out: &Path,
    what: &str,
    cond: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let mut child = Reaper(child);
    let start = Instant::now();
    loop {
        let names = file_names(out);
        if cond(&names) {
            child.0.kill().unwrap(); // SIGKILL
            child.0.wait().unwrap();
            return file_names(out);
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("child exited ({status}) before the kill point '{what}'; files: {names:?}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timeout waiting for '{what}'"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn units(names: &[String]) -> usize {
    names.iter().filter(|n| n.ends_with(".safetensors")).count()
}

fn has_tmp(names: &[String]) -> bool {
    names.iter().any(|n| n.ends_with(".tmp"))
}

fn spec() -> Spec {
    Spec {
        layers: 10,
        hidden: 128,
        kv: 32,
        inter: 256,
        vocab: 16384, // 4 MiB embedding: a long-lived .tmp to catch
        ..Spec::tiny()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    ckpt: PathBuf,
    reference: PathBuf,
    out: PathBuf,
    spec: Spec,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let reference = tmp.path().join("reference");
    run_split(&ckpt, &layout(&spec), &opts_to(&reference)).unwrap();
    let out = tmp.path().join("out");
    Fixture {
        _tmp: tmp,
        ckpt,
        reference,
        out,
        spec,
    }
}

impl Fixture {
    fn cfg(&self, pause_planned: u64, pause_unit: u64, pause_last: u64) -> ChildCfg {
        ChildCfg {
            ckpt: self.ckpt.clone(),
            out: self.out.clone(),
            spec: self.spec.clone(),
            pause_planned,
            pause_unit,
            pause_last,
        }
    }
}

#[test]
fn killed_at_several_points_then_resumed_is_byte_identical() {
    let f = fixture();
    let n_units = layout(&f.spec).units.len();

    // 1. Right after the plan is written, before any unit.
    let left = kill_when(spawn(&f.cfg(10_000, 0, 0)), &f.out, "plan written", |n| {
        n.iter().any(|x| x == "split.plan.json")
    });
    assert_eq!(left, ["split.plan.json"], "killed after the plan");

    // 2. While a unit's temporary file is being written (the first one: the 4 MiB embedding).
    //    The kill can race with the rename; then the next unit's .tmp is the target.
    let mut caught = false;
    for _ in 0..5 {
        let left = kill_when(spawn(&f.cfg(0, 0, 0)), &f.out, "a .tmp", has_tmp);
        assert!(!left.iter().any(|n| n == "manifest.json"));
        if has_tmp(&left) {
            caught = true;
            break;
        }
    }
    assert!(caught, "never killed while a .tmp was being written");

    // 3. After three complete unit files.
    let left = kill_when(spawn(&f.cfg(0, 150, 0)), &f.out, "3 units", |n| {
        units(n) >= 3
    });
    assert!((3..n_units).contains(&units(&left)), "{left:?}");
    assert!(!left.iter().any(|n| n == "manifest.json"));

    // 4. Every unit written, manifest not yet.
    let left = kill_when(
        spawn(&f.cfg(0, 0, 10_000)),
        &f.out,
        "before manifest",
        |n| units(n) == n_units,
    );
    assert_eq!(units(&left), n_units);
    assert!(!left.iter().any(|n| n == "manifest.json"));

    // Debris of other interrupted writes goes; files that are not the splitter's stay.
    std::fs::write(f.out.join("manifest.json.tmp"), b"{\"partial").unwrap();
    std::fs::write(f.out.join("layer.999.safetensors.tmp"), b"partial").unwrap();
    std::fs::write(f.out.join("NOTES.txt"), b"mine").unwrap();

    // Rerun to completion: everything is reused, and the bytes are those of a clean split.
    let (_, outcome, _) = run_split(&f.ckpt, &layout(&f.spec), &opts_to(&f.out)).unwrap();
    assert_eq!(std::fs::read(f.out.join("NOTES.txt")).unwrap(), b"mine");
    std::fs::remove_file(f.out.join("NOTES.txt")).unwrap();
    assert_eq!(
        outcome,
        SplitOutcome::Written {
            bytes_written: 0,
            units_written: 0,
            units_resumed: n_units
        }
    );
    assert_same_dir(&f.out, &f.reference);
}

#[test]
fn killed_mid_unit_resumes_the_missing_units_only() {
    let f = fixture();
    let n_units = layout(&f.spec).units.len();
    // Kill while a later unit's .tmp exists, i.e. some units done, one partial.
    let left = kill_when(spawn(&f.cfg(0, 40, 0)), &f.out, "2 units + tmp", |n| {
        units(n) >= 2 && has_tmp(n)
    });
    let done = units(&left);
    assert!(done >= 2 && done < n_units, "{left:?}");
    let (_, outcome, events) = run_split(&f.ckpt, &layout(&f.spec), &opts_to(&f.out)).unwrap();
    let SplitOutcome::Written {
        units_written,
        units_resumed,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(units_resumed, done);
    assert_eq!(units_written, n_units - done);
    assert!(matches!(events[0], SplitEvent::Planned { already_done, .. } if already_done == done));
    assert_same_dir(&f.out, &f.reference);
}
