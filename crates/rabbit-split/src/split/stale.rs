//! Whether an existing split can be reused as is.

use std::fs;
use std::path::Path;

use crate::checkpoint::source_fingerprint;
use crate::error::{Result, SplitError};
use crate::layout::Layout;
use crate::manifest::Manifest;

use super::SplitOptions;

/// Fast check (stat calls and a manifest read, no tensor data) that `split_dir` holds a complete
/// split of `checkpoint_dir` made with this layout and these options: manifest present and
/// matching, every unit file present with its recorded size, and the source fingerprint
/// unchanged — or the source weights deleted by a previous `delete_original` split.
pub fn is_current(
    split_dir: &Path,
    checkpoint_dir: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> Result<bool> {
    Ok(stale_reason(split_dir, checkpoint_dir, layout, opts)?.is_none())
}

/// Why the split in `split_dir` cannot be reused (`None` when it can); same checks as
/// [`is_current`], for messages and logs.
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
    match source_fingerprint(checkpoint_dir) {
        Ok(fp) if fp == m.source_fingerprint => Ok(None),
        Ok(_) => Ok(Some(format!(
            "the checkpoint in {} changed since it was split",
            checkpoint_dir.display()
        ))),
        Err(e @ (SplitError::MissingConfig { .. } | SplitError::BadConfig { .. })) => Err(e),
        Err(e @ (SplitError::MissingWeights { .. } | SplitError::MissingShard { .. })) => {
            if m.original_deleted {
                Ok(None)
            } else {
                Ok(Some(e.to_string()))
            }
        }
        // Anything else wrong with the source: not reusable; `split` reports the real error.
        Err(e) => Ok(Some(e.to_string())),
    }
}
