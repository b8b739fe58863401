//! `delete_original`: verify the split (and the other splits made from the same weights), mark
//! them the only copy, then delete the source weights.

use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{
    source_fingerprint, INDEX_FILE, SINGLE_FILE, TORCH_INDEX_FILE, TORCH_SINGLE_FILE,
};
use crate::error::{Result, SplitError};
use crate::fsutil::{self, remove_if_exists, write_atomic, DirLock};
use crate::integrity::{self, Checksums};
use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::quant::Compression;
use crate::verify::verify_against;

use super::dir::is_safe_file_name;
use super::{default_split_dir_for, SplitEvent};

/// The source weight files that exist now, in deletion order: the PyTorch `.bin` weights, then
/// the safetensors weights (each shards first, index last). Works on a partially deleted
/// checkpoint. Both formats go, when a checkpoint has both: a `.bin` copy left beside deleted
/// safetensors would become the checkpoint's weights, which the split marked as the only copy
/// was not made from. The source (safetensors, when both are there) goes last, so a deletion
/// that stops partway leaves that source, whole or in part, never another one.
pub(super) fn existing_source_weights(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (single, index) in [
        (TORCH_SINGLE_FILE, TORCH_INDEX_FILE),
        (SINGLE_FILE, INDEX_FILE),
    ] {
        existing_weights_of(dir, single, index, &mut out);
    }
    out
}

/// [`existing_source_weights`] of one format: the single file if present, else the index's
/// shards that exist and the index.
fn existing_weights_of(dir: &Path, single: &str, index: &str, out: &mut Vec<PathBuf>) {
    let single = dir.join(single);
    if single.is_file() {
        out.push(single);
        return;
    }
    let index = dir.join(index);
    if let Ok(Some(bytes)) = fsutil::read_regular(&index) {
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let mut shards: Vec<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                let p = dir.join(s);
                if is_safe_file_name(s) && p.is_file() {
                    out.push(p);
                }
            }
        }
        out.push(index);
    }
}

fn delete_source_weights(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for p in existing_source_weights(dir) {
        if remove_if_exists(&p)? {
            n += 1;
        }
    }
    fsutil::sync_dir(dir)?;
    Ok(n)
}

/// How thoroughly [`dependent_splits`] checks each split.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DepCheck {
    /// The [`crate::integrity`] checks (sizes, headers, checksums of files changed since they
    /// were last verified): the fail-fast check before a split is written.
    Cheap,
    /// Every byte hashed: the check right before the weights are deleted.
    Full,
}

/// The other splits of this checkpoint in the default places (`rabbit-split`, `-4bit`, `-8bit`)
/// made from the source as it is now, each with its lock held: deleting the source leaves them
/// as the only copy too. Source weights that are (partly) gone already leave no split to check:
/// none can have been made from them as they are now.
pub(super) fn dependent_splits(
    checkpoint_dir: &Path,
    out: &Path,
    check: DepCheck,
) -> Result<Vec<(PathBuf, Manifest, DirLock)>> {
    let fingerprint = match source_fingerprint(checkpoint_dir) {
        Ok(fp) => fp,
        Err(SplitError::MissingWeights { .. } | SplitError::MissingShard { .. }) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let canon = |p: &Path| fs::canonicalize(p).ok();
    let mut deps = Vec::new();
    for c in [None, Some(Compression::Nf4), Some(Compression::Int8)] {
        let dir = default_split_dir_for(checkpoint_dir, c);
        if canon(&dir).is_none() || canon(&dir) == canon(out) {
            continue;
        }
        let depends = |m: &Manifest| m.source_fingerprint == fingerprint && !m.original_deleted;
        if !Manifest::load(&dir).is_ok_and(|m| depends(&m)) {
            continue;
        }
        let refuse = |reason: String| SplitError::DependentSplit {
            dir: checkpoint_dir.to_path_buf(),
            split_dir: dir.clone(),
            reason,
        };
        // Not waiting: a process writing that split may itself be waiting for ours.
        let Some(lock) = DirLock::try_acquire(&dir)? else {
            return Err(refuse("it is being written by another process".into()));
        };
        let m = Manifest::load(&dir)?;
        if depends(&m) {
            let damaged = match check {
                DepCheck::Cheap => integrity::check(&dir, &m, Checksums::Changed).damaged,
                DepCheck::Full => verify_against(&dir, &m).damaged,
            };
            if !damaged.is_empty() {
                let e = SplitError::Damaged {
                    dir: dir.clone(),
                    damaged,
                };
                return Err(refuse(format!(
                    "{e}; rerun its split to repair it, or delete it"
                )));
            }
            deps.push((dir, m, lock));
        }
    }
    Ok(deps)
}

/// Verifies `m` against the files, and every other split in the default places that depends on
/// the same source (see [`dependent_splits`]); marks them all `original_deleted` (durably) and
/// then deletes the source weights. Marking first means a crash mid-deletion still leaves
/// splits that are recognized as the only copy, and every split made from these weights keeps
/// loading after they are gone.
pub(super) fn verify_and_delete_original(
    checkpoint_dir: &Path,
    out: &Path,
    mut m: Manifest,
    on_event: &mut dyn FnMut(&SplitEvent),
) -> Result<()> {
    verify_against(out, &m).into_result(out)?;
    // The locks of the dependent splits are held until the weights are gone (`deps` lives
    // until after the deletion): a run that took one in between could rewrite that split (a
    // repair, other options) from the weights being deleted after it was verified and marked,
    // leaving a half-written split, or one not marked as the only copy, whose source is gone.
    let mut deps = dependent_splits(checkpoint_dir, out, DepCheck::Full)?;
    on_event(&SplitEvent::Verified);
    for (dir, dm, _lock) in &mut deps {
        dm.original_deleted = true;
        write_atomic(&dir.join(MANIFEST_FILE), &dm.to_json())?;
    }
    m.original_deleted = true;
    write_atomic(&out.join(MANIFEST_FILE), &m.to_json())?;
    let files = delete_source_weights(checkpoint_dir)?;
    drop(deps);
    on_event(&SplitEvent::OriginalDeleted { files });
    Ok(())
}

/// Finishes a deletion that stopped partway (interrupted, or a shard that could not be
/// removed): the split in `out` was verified and marked `original_deleted` before it started,
/// as were the splits depending on the same weights, so what is left of the source weights is
/// deleted without checking again (the weights cannot be fingerprinted any more anyway).
pub(super) fn finish_deleting_original(
    checkpoint_dir: &Path,
    on_event: &mut dyn FnMut(&SplitEvent),
) -> Result<()> {
    let files = delete_source_weights(checkpoint_dir)?;
    on_event(&SplitEvent::OriginalDeleted { files });
    Ok(())
}
