//! Hygiene of the output directory: never overwrite the source, and remove only our own debris.

use std::fs;
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Result, SplitError};
use crate::fsutil::remove_if_exists;
use crate::manifest::{MANIFEST_FILE, PLAN_FILE};

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

pub(super) fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
}

/// Removes leftovers of interrupted writes: `<unit>.safetensors.tmp`, `manifest.json.tmp`,
/// `split.plan.json.tmp`. Other files in the directory are never touched.
pub(super) fn remove_stray_tmp(out: &Path) -> Result<()> {
    let rd = fs::read_dir(out).map_err(|e| SplitError::io(out, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| SplitError::io(out, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.ends_with(".safetensors.tmp")
            || name == format!("{MANIFEST_FILE}.tmp")
            || name == format!("{PLAN_FILE}.tmp");
        if ours && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}
