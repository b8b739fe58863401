//! The output directory before writing: the `rabbit_synth.json` stamp, which entries are ours,
//! and whether an earlier checkpoint can be reused.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_err, SynthDtype, SynthError, SynthOverrides, FORMAT_VERSION, STAMP_FILE};

/// The options that determine a checkpoint's content, as stored in the stamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StampOptions {
    pub(super) arch: String,
    pub(super) preset: String,
    pub(super) shards: usize,
    pub(super) dtype: SynthDtype,
    pub(super) seed: u64,
    pub(super) overrides: SynthOverrides,
}

/// `rabbit_synth.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Stamp {
    pub(super) generator: String,
    pub(super) format: u32,
    pub(super) options: StampOptions,
    /// False while generating; true once every file but config.json is in place.
    pub(super) complete: bool,
    /// File name -> size, for a cheap completeness check before reuse.
    pub(super) files: BTreeMap<String, u64>,
}

pub(super) const GENERATOR: &str = "rabbitllm synth";

/// Whether a directory entry is a file `rabbit synth` writes (or its temporary).
pub(super) fn is_our_file(name: &str) -> bool {
    // Temporaries of an interrupted run: `.<name>.XXXXXX.tmp` (the atomic writer's) or the
    // `<name>.tmp` of earlier versions.
    let base = rabbit_split::fsutil::temp_target(name)
        .or_else(|| name.strip_suffix(".tmp"))
        .unwrap_or(name);
    const FIXED: &[&str] = &[
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
        "model.safetensors.index.json",
        STAMP_FILE,
    ];
    if FIXED.contains(&base) {
        return true;
    }
    // model-00001-of-00003.safetensors
    base.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
        })
}

fn read_stamp(dir: &Path) -> Option<Box<Stamp>> {
    let text = fs::read_to_string(dir.join(STAMP_FILE)).ok()?;
    serde_json::from_str(&text).ok().map(Box::new)
}

/// The state of the output directory before writing.
pub(super) enum DirState {
    /// Missing or empty.
    Fresh,
    /// Our own earlier output (complete or not), with its stamp if readable.
    Ours(Option<Box<Stamp>>),
}

pub(super) fn inspect_dir(dir: &Path) -> Result<DirState, SynthError> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            return Ok(DirState::Fresh);
        }
        Err(e) => return Err(io_err(dir)(e)),
        Ok(m) if !m.is_dir() => {
            return Err(SynthError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if names.is_empty() {
        return Ok(DirState::Fresh);
    }
    if names.iter().any(|n| n == STAMP_FILE) {
        return Ok(DirState::Ours(read_stamp(dir)));
    }
    names.sort();
    let mut found = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        found.push_str(&format!(" and {} more", names.len() - 5));
    }
    Err(SynthError::ForeignDirectory {
        dir: dir.to_path_buf(),
        found,
    })
}

/// True when `stamp` describes a finished checkpoint of exactly these options, still on disk.
pub(super) fn reusable(dir: &Path, stamp: &Stamp, want: &StampOptions) -> bool {
    stamp.generator == GENERATOR
        && stamp.format == FORMAT_VERSION
        && stamp.complete
        && stamp.options == *want
        && dir.join("config.json").is_file()
        && stamp.files.iter().all(|(name, size)| {
            fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == *size)
        })
}
