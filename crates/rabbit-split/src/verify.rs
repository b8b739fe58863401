//! Full verification of a split directory: every unit file exists, has the recorded size, a
//! header consistent with the manifest, and the recorded checksum. Reads every byte once.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::checkpoint::read_safetensors_header;
use crate::error::{Damage, Result, SplitError};
use crate::manifest::{Manifest, UnitEntry, FORMAT_NAME};
use crate::writer::file_checksum;

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
/// manifest itself cannot be loaded; damaged unit files are listed in the report.
pub fn verify(split_dir: &Path) -> Result<VerifyReport> {
    let m = Manifest::load(split_dir)?;
    Ok(verify_against(split_dir, &m, &mut Vec::new()))
}

/// Verifies the unit files of `split_dir` against an in-memory manifest (used before the
/// manifest is written when the originals are to be deleted).
pub(crate) fn verify_against(split_dir: &Path, m: &Manifest, buf: &mut Vec<u8>) -> VerifyReport {
    let mut report = VerifyReport::default();
    for u in &m.units {
        let path = split_dir.join(&u.file);
        report.files_checked += 1;
        match check_unit(&path, m, u, buf) {
            Ok(bytes) => report.bytes_checked += bytes,
            Err((bytes, problem)) => {
                report.bytes_checked += bytes;
                report.damaged.push(Damage {
                    file: path,
                    problem,
                });
            }
        }
    }
    report
}

fn check_unit(
    path: &PathBuf,
    m: &Manifest,
    u: &UnitEntry,
    buf: &mut Vec<u8>,
) -> std::result::Result<u64, (u64, String)> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err((0, format!("missing (unit {})", u.name)))
        }
        Err(e) => return Err((0, format!("cannot open: {e}"))),
    };
    let len = f
        .metadata()
        .map_err(|e| (0, format!("cannot stat: {e}")))?
        .len();
    if len != u.size {
        return Err((
            0,
            format!(
                "size is {len} bytes but the manifest says {} (truncated or replaced?)",
                u.size
            ),
        ));
    }
    let h =
        read_safetensors_header(path, &f).map_err(|e| (0, format!("unreadable header: {e}")))?;
    if h.data_offset() != u.data_offset {
        return Err((
            0,
            format!(
                "data region starts at {} but the manifest says {}",
                h.data_offset(),
                u.data_offset
            ),
        ));
    }
    if h.data_offset() % m.options.alignment != 0 {
        return Err((
            0,
            format!("data region at {} is not aligned", h.data_offset()),
        ));
    }
    if h.metadata.get("format").map(String::as_str) != Some(FORMAT_NAME)
        || h.metadata.get("source_fingerprint") != Some(&m.source_fingerprint)
    {
        return Err((
            0,
            "header metadata does not match the manifest (file from another split?)".into(),
        ));
    }
    let same_tensors = h.tensors.len() == u.tensors.len()
        && h.tensors.iter().zip(&u.tensors).all(|(a, b)| {
            a.name == b.name
                && a.dtype == b.dtype
                && a.shape == b.shape
                && a.start == b.offset
                && a.end - a.start == b.len
        });
    if !same_tensors {
        return Err((0, "tensors in the header differ from the manifest".into()));
    }
    drop(f);
    let (read, sum) = file_checksum(path, buf).map_err(|e| (0, format!("cannot read: {e}")))?;
    if read != u.size {
        return Err((read, format!("read {read} bytes, expected {}", u.size)));
    }
    if sum != u.checksum {
        return Err((
            read,
            format!(
                "checksum mismatch: file has {sum}, manifest says {} (corrupted data)",
                u.checksum
            ),
        ));
    }
    Ok(read)
}
