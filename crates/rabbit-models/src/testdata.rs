//! Where the tests find the real tokenizer files that are not committed (the shared data
//! directory beside the checkout). Public for the workspace's test suites; not an API.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory of the real `name` tokenizer (`qwen2`, `qwen3`): under `RABBIT_SHARED_TOKENIZERS`
/// when set, else under `default_root`. Absent: says on stderr that the calling test needs it and
/// did not run, and returns `None`; under CI (`CI` set), where the data is always present, an
/// absent directory is a failure instead.
pub fn shared_tokenizer(default_root: &Path, name: &str) -> Option<PathBuf> {
    let root = std::env::var_os("RABBIT_SHARED_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_root.to_path_buf());
    let dir = root.join(name);
    if dir.join("tokenizer.json").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "needs the real {name} tokenizer at {} (the shared data directory beside the checkout, \
         or set RABBIT_SHARED_TOKENIZERS)",
        dir.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED, did not run: {msg}");
    None
}
