//! Hygiene of the output directory: never write into a directory of someone else's files, never
//! overwrite the source, and remove only our own debris.

use std::fs;
use std::io;
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Result, SplitError};
use crate::fsutil::{read_regular, remove_if_exists, temp_target, TEMP_SUFFIX};
use crate::integrity::VERIFIED_FILE;
use crate::manifest::{Manifest, FORMAT_NAME, MANIFEST_FILE, PLAN_FILE};

use super::plan::UnitPlan;

/// When the split goes into the checkpoint directory itself, no file of the split may have the
/// name of a source file.
pub(super) fn refuse_to_overwrite_source(
    ckpt: &Checkpoint,
    out: &Path,
    units: &[UnitPlan<'_>],
) -> Result<()> {
    let canon = |p: &Path| fs::canonicalize(p).map_err(|e| SplitError::io(p, e));
    if canon(out)? != canon(&ckpt.dir)? {
        return Ok(());
    }
    let ours: Vec<&str> = units
        .iter()
        .map(|u| u.file.as_str())
        .chain([MANIFEST_FILE, PLAN_FILE])
        .collect();
    let source = ckpt.files.iter().chain(&ckpt.index);
    for p in source {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if ours.contains(&name) || name == crate::checkpoint::CONFIG_FILE {
            return Err(SplitError::InvalidOptions {
                reason: format!(
                    "splitting into the checkpoint directory would overwrite {}",
                    p.display()
                ),
            });
        }
    }
    Ok(())
}

/// Refuses to split into `out` when it holds a split whose original weights were deleted and
/// that was made from other weights than `fingerprint`: it is the only copy of its model, and
/// a split with another plan would delete its manifest and unit files. A split of the same
/// source (same fingerprint) is repaired or redone as usual.
pub(super) fn refuse_to_destroy_only_copy(
    out: &Path,
    checkpoint_dir: &Path,
    fingerprint: &str,
) -> Result<()> {
    match Manifest::load(out) {
        Ok(m) if m.original_deleted && m.source_fingerprint != fingerprint => {
            Err(SplitError::OnlyCopy {
                dir: checkpoint_dir.to_path_buf(),
                split_dir: out.to_path_buf(),
            })
        }
        _ => Ok(()),
    }
}

pub(super) fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
}

/// Whether `name` is a file a split directory holds.
fn is_split_file(name: &str) -> bool {
    name.ends_with(".safetensors") || [MANIFEST_FILE, PLAN_FILE, VERIFIED_FILE].contains(&name)
}

/// Whether `name` is a leftover of an interrupted write of a split file: a temporary of
/// [`crate::fsutil::AtomicFile`], or the `<name>.tmp` of earlier versions.
fn is_split_temp(name: &str) -> bool {
    temp_target(name)
        .or_else(|| name.strip_suffix(TEMP_SUFFIX))
        .is_some_and(is_split_file)
}

/// Whether `name` in `dir` is the plan or manifest of a split of ours (its `format` says so,
/// whatever else is wrong with it).
fn is_our_json(dir: &Path, name: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Head {
        format: Option<String>,
    }
    read_regular(&dir.join(name))
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<Head>(&b).ok())
        .is_some_and(|h| h.format.as_deref() == Some(FORMAT_NAME))
}

/// Refuses to write a split into `out` unless it is missing, empty, or already holds a split of
/// ours (complete or interrupted: its plan or manifest says so, or only our temporaries are
/// there). Anything else may be the user's files, which a split would overwrite or delete. The
/// checkpoint directory itself is allowed as long as no file of the split (`files`, plus
/// manifest, plan and record) exists there yet.
pub(super) fn refuse_foreign_dir(out: &Path, checkpoint_dir: &Path, files: &[&str]) -> Result<()> {
    match fs::metadata(out) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SplitError::io(out, e)),
        Ok(md) if !md.is_dir() => {
            return Err(SplitError::NotADirectory {
                path: out.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(out).map_err(|e| SplitError::io(out, e))? {
        let entry = entry.map_err(|e| SplitError::io(out, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if names.iter().all(|n| is_split_temp(n))
        || is_our_json(out, PLAN_FILE)
        || is_our_json(out, MANIFEST_FILE)
    {
        return Ok(());
    }
    if fs::canonicalize(out).ok() == fs::canonicalize(checkpoint_dir).ok() {
        let ours = files
            .iter()
            .copied()
            .chain([MANIFEST_FILE, PLAN_FILE, VERIFIED_FILE]);
        for name in ours {
            if names.iter().any(|n| n == name) {
                return Err(SplitError::InvalidOptions {
                    reason: format!(
                        "splitting into the checkpoint directory would overwrite {}",
                        out.join(name).display()
                    ),
                });
            }
        }
        return Ok(());
    }
    names.sort();
    const SHOWN: usize = 5;
    let mut found = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        found.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    Err(SplitError::ForeignDirectory {
        dir: out.to_path_buf(),
        found,
    })
}

/// Removes leftovers of interrupted writes of split files (see [`is_split_temp`]). Other files
/// in the directory are never touched.
pub(super) fn remove_stray_tmp(out: &Path) -> Result<()> {
    let rd = fs::read_dir(out).map_err(|e| SplitError::io(out, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| SplitError::io(out, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_split_temp(name) && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}
