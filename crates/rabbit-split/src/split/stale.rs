//! Whether an existing split can be reused as is.

use std::fs;
use std::path::Path;

use crate::checkpoint::source_fingerprint;
use crate::error::{Result, SplitError};
use crate::integrity::{self, Checksums};
use crate::layout::Layout;
use crate::manifest::Manifest;

use super::SplitOptions;

/// Whether `split_dir` holds a complete, undamaged split of `checkpoint_dir` made with this
/// layout and these options: manifest present and matching, the source fingerprint unchanged
/// (or the source weights deleted by a previous `delete_original` split), and every unit file
/// passing the [`crate::integrity`] checks (a regular file of the recorded size with the
/// expected header; checksums only for files changed since they were last verified). Fast:
/// stat calls, the manifest and one small header read per file, unless files changed.
pub fn is_current(
    split_dir: &Path,
    checkpoint_dir: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> Result<bool> {
    Ok(stale_reason(split_dir, checkpoint_dir, layout, opts)?.is_none())
}

/// Why the split in `split_dir` cannot be reused (`None` when it can); same checks as
/// [`is_current`], for messages and logs. A damaged split's reason names every damaged file.
pub fn stale_reason(
    split_dir: &Path,
    checkpoint_dir: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> Result<Option<String>> {
    let m = match Manifest::load(split_dir) {
        Ok(m) => m,
        Err(e @ (SplitError::MissingManifest { .. } | SplitError::BadManifest { .. })) => {
            return Ok(Some(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    if m.options != opts.settings() {
        return Ok(Some(format!(
            "it was made with different options ({:?}, now {:?})",
            m.options,
            opts.settings()
        )));
    }
    if m.layout_digest != layout.digest()
        || m.architecture != layout.architecture
        || m.tied_lm_head != layout.tied_lm_head
        || m.units.len() != layout.units.len()
        || m.units
            .iter()
            .zip(&layout.units)
            .any(|(u, s)| u.name != s.name || u.kind != s.kind)
    {
        return Ok(Some(format!(
            "it was made with a different {} layout",
            m.architecture
        )));
    }
    for u in &m.units {
        let p = split_dir.join(&u.file);
        match fs::metadata(&p) {
            Ok(md) if md.is_file() && md.len() == u.size => {}
            Ok(md) if !md.is_file() => {
                return Ok(Some(format!("{} is not a regular file", p.display())))
            }
            Ok(md) => {
                return Ok(Some(format!(
                    "{} is {} bytes, the manifest says {}",
                    p.display(),
                    md.len(),
                    u.size
                )))
            }
            Err(_) => return Ok(Some(format!("{} is missing", p.display()))),
        }
    }
    let fresh = match source_fingerprint(checkpoint_dir) {
        Ok(fp) if fp == m.source_fingerprint => None,
        Ok(_) => Some(format!(
            "the checkpoint in {} changed since it was split",
            checkpoint_dir.display()
        )),
        Err(e @ (SplitError::MissingConfig { .. } | SplitError::BadConfig { .. })) => {
            return Err(e)
        }
        Err(e @ (SplitError::MissingWeights { .. } | SplitError::MissingShard { .. })) => {
            (!m.original_deleted).then(|| e.to_string())
        }
        // Anything else wrong with the source: not reusable; `split` reports the real error.
        Err(e) => Some(e.to_string()),
    };
    if fresh.is_some() {
        return Ok(fresh);
    }
    // Last, as the only check that may read data (files changed since their last verification).
    let report = integrity::check(split_dir, &m, Checksums::Changed);
    Ok((!report.is_ok()).then(|| {
        SplitError::Damaged {
            dir: split_dir.to_path_buf(),
            damaged: report.damaged,
        }
        .to_string()
    }))
}
