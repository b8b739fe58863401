//! Full verification of a split directory: every unit file exists, has the recorded size, a
//! header consistent with the manifest, and the recorded checksum. Reads every byte once.

use std::path::Path;

use crate::error::{Damage, Result, SplitError};
use crate::integrity::{self, Checksums};
use crate::manifest::Manifest;

/// Outcome of [`verify`]: how much was checked and every damaged file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Unit files examined (damaged ones included).
    pub files_checked: usize,
    /// Bytes read and checksummed.
    pub bytes_checked: u64,
    /// Missing or corrupt files, in manifest order.
    pub damaged: Vec<Damage>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty()
    }

    /// Turns a report with damage into [`SplitError::Damaged`] for `split_dir`.
    pub fn into_result(self, split_dir: &Path) -> Result<VerifyReport> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(SplitError::Damaged {
                dir: split_dir.to_path_buf(),
                damaged: self.damaged,
            })
        }
    }
}

/// Verifies a complete split (sizes, headers, checksums of every unit file). Errors only when the
/// manifest itself cannot be loaded; damaged unit files are listed in the report. Files found
/// good are recorded as verified (see [`crate::integrity`]).
pub fn verify(split_dir: &Path) -> Result<VerifyReport> {
    let m = Manifest::load(split_dir)?;
    Ok(verify_against(split_dir, &m))
}

/// Verifies the unit files of `split_dir` against an in-memory manifest (used before the
/// manifest is written when the originals are to be deleted).
pub(crate) fn verify_against(split_dir: &Path, m: &Manifest) -> VerifyReport {
    let r = integrity::check_with(split_dir, m, Checksums::All, false);
    VerifyReport {
        files_checked: r.files_checked,
        bytes_checked: r.bytes_hashed,
        damaged: r.damaged,
    }
}
