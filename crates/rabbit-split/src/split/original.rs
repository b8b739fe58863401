//! `delete_original`: verify the split, mark it the only copy, then delete the source weights.

use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::Result;
use crate::fsutil::{self, remove_if_exists, write_atomic};
use crate::manifest::{Manifest, MANIFEST_FILE};
use crate::verify::verify_against;

use super::dir::is_safe_file_name;
use super::SplitEvent;

/// The source weight files that exist now, in deletion order (shards first, index last). Works
/// on a partially deleted checkpoint.
pub(super) fn existing_source_weights(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        out.push(single);
        return out;
    }
    let index = dir.join(INDEX_FILE);
    if let Ok(bytes) = fs::read(&index) {
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
    out
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

/// Verifies `m` against the files, marks the manifest `original_deleted` (durably) and then
/// deletes the source weights. Marking first means a crash mid-deletion still leaves a split that
/// is recognized as the only copy.
pub(super) fn verify_and_delete_original(
    checkpoint_dir: &Path,
    out: &Path,
    mut m: Manifest,
    buf: &mut Vec<u8>,
    on_event: &mut dyn FnMut(&SplitEvent),
) -> Result<()> {
    verify_against(out, &m, buf).into_result(out)?;
    on_event(&SplitEvent::Verified);
    m.original_deleted = true;
    write_atomic(&out.join(MANIFEST_FILE), &m.to_json())?;
    let files = delete_source_weights(checkpoint_dir)?;
    on_event(&SplitEvent::OriginalDeleted { files });
    Ok(())
}
