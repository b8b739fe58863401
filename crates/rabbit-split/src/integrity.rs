//! Integrity of a split, checked wherever one is opened or reused.
//!
//! Cheap checks, always: every unit file is a regular file of the recorded size whose safetensors
//! header matches the manifest (format, unit name, source fingerprint, data region, tensor names,
//! dtypes, shapes and offsets). That catches a file from another model or split, two files
//! swapped, a truncated file and an edited manifest, for the price of one small read per file.
//!
//! Checksums (the whole file's XXH3-64 against the manifest) catch changed bytes. Reading a whole
//! model at every start would cost as much as a sweep, so by default only files that *changed
//! since they were last verified* are hashed: `split.verified.json`, next to the manifest,
//! records for each file verified good its checksum and its identity (size, inode, mtime and
//! ctime — any write or replacement changes ctime, which users cannot set). The splitter writes
//! the record for the files it writes, so a fresh split is never re-read; a file edited, copied
//! over or replaced afterwards is hashed (once) before use. [`Checksums::All`] hashes every file
//! regardless (`--verify-split`, `rabbit split --verify`); damage that keeps a file's identity
//! (media errors) is only seen that way.

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Damage, Result, SplitError};
use crate::fsutil;
use crate::manifest::{Manifest, UnitEntry, FORMAT_NAME, FORMAT_VERSION};
use crate::safetensors_header::read_safetensors_header;
use crate::writer::checksum_file;

/// File name of the verification record inside a split directory.
pub const VERIFIED_FILE: &str = "split.verified.json";
const RECORD_FORMAT: &str = "rabbit-split-verified";
const RECORD_VERSION: u32 = 1;

/// Which unit files get their checksum computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksums {
    /// Only files not verified since they last changed (see the module docs).
    Changed,
    /// Every file.
    All,
}

/// Outcome of [`check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Unit files examined (damaged ones included).
    pub files_checked: usize,
    /// Unit files whose checksum was computed.
    pub files_hashed: usize,
    /// Bytes read to compute checksums.
    pub bytes_hashed: u64,
    /// Missing or damaged files, in manifest order.
    pub damaged: Vec<Damage>,
    /// Why the verification record could not be updated (read-only directory, ...): the next
    /// check hashes again what this one hashed.
    pub record_error: Option<String>,
}

impl IntegrityReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty()
    }

    /// Turns a report with damage into [`SplitError::Damaged`] for `split_dir`.
    pub fn into_result(self, split_dir: &Path) -> Result<IntegrityReport> {
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

/// A file's identity when it was verified: any change to its bytes changes one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    checksum: String,
    size: u64,
    inode: u64,
    mtime: [i64; 2],
    ctime: [i64; 2],
    /// The file changed less than [`RACY_SECS`] before it was verified: a write in the same
    /// timestamp tick as the verification would keep its times, so it is hashed again next time
    /// (as git treats "racily clean" index entries).
    #[serde(default)]
    racy: bool,
}

/// Timestamp granularity allowed for (coarse kernel clocks tick in milliseconds, some file
/// systems in seconds).
const RACY_SECS: i64 = 2;

impl Stamp {
    fn of(md: &Metadata, checksum: &str) -> Stamp {
        let now = crate::testing::now_secs();
        Stamp {
            checksum: checksum.to_string(),
            size: md.len(),
            inode: md.ino(),
            mtime: [md.mtime(), md.mtime_nsec()],
            ctime: [md.ctime(), md.ctime_nsec()],
            racy: md.ctime().max(md.mtime()) + RACY_SECS > now,
        }
    }

    /// Whether a file with metadata `md` is still the one verified as `checksum`.
    fn vouches_for(&self, md: &Metadata, checksum: &str) -> bool {
        !self.racy
            && self.checksum == checksum
            && self.size == md.len()
            && self.inode == md.ino()
            && self.mtime == [md.mtime(), md.mtime_nsec()]
            && self.ctime == [md.ctime(), md.ctime_nsec()]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    format: String,
    format_version: u32,
    /// Unit file name -> identity when last verified good.
    files: BTreeMap<String, Stamp>,
}

/// The record of `split_dir`; empty when missing or unreadable (it is only a cache).
fn read_record(split_dir: &Path) -> BTreeMap<String, Stamp> {
    fsutil::read_regular(&split_dir.join(VERIFIED_FILE))
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        .filter(|r| r.format == RECORD_FORMAT && r.format_version == RECORD_VERSION)
        .map(|r| r.files)
        .unwrap_or_default()
}

fn write_record(split_dir: &Path, files: BTreeMap<String, Stamp>) -> Result<()> {
    let r = Record {
        format: RECORD_FORMAT.into(),
        format_version: RECORD_VERSION,
        files,
    };
    let mut json = serde_json::to_vec_pretty(&r).expect("record serializes");
    json.push(b'\n');
    fsutil::write_atomic(&split_dir.join(VERIFIED_FILE), &json)
}

/// Records `(file, checksum)` pairs as verified now (e.g. just written by the splitter), merged
/// into the existing record. Files that cannot be stat'ed are left out.
pub(crate) fn record_verified<'a>(
    split_dir: &Path,
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<()> {
    let mut record = read_record(split_dir);
    let before = record.clone();
    for (file, checksum) in files {
        if let Ok(md) = std::fs::metadata(split_dir.join(file)) {
            record.insert(file.to_string(), Stamp::of(&md, checksum));
        }
    }
    if record == before {
        return Ok(());
    }
    write_record(split_dir, record)
}

/// Checks every unit file of `m` in `split_dir` (see the module docs) and updates the
/// verification record: files verified good are recorded, damaged ones dropped from it (so the
/// next check hashes them again). Errors only go into the report.
pub fn check(split_dir: &Path, m: &Manifest, checksums: Checksums) -> IntegrityReport {
    check_with(split_dir, m, checksums, true)
}

/// [`check`]; `keep_cache: false` drops hashed files from the page cache afterwards.
pub(crate) fn check_with(
    split_dir: &Path,
    m: &Manifest,
    checksums: Checksums,
    keep_cache: bool,
) -> IntegrityReport {
    let old = read_record(split_dir);
    let mut record = old.clone();
    let mut report = IntegrityReport::default();
    let mut buf = Vec::new();
    for u in &m.units {
        let path = split_dir.join(&u.file);
        report.files_checked += 1;
        let vouched = match checksums {
            Checksums::Changed => old.get(&u.file),
            Checksums::All => None,
        };
        match check_unit(&path, m, u, vouched, &mut buf, keep_cache) {
            Ok((stamp, hashed)) => {
                if let Some(bytes) = hashed {
                    report.files_hashed += 1;
                    report.bytes_hashed += bytes;
                }
                record.insert(u.file.clone(), stamp);
            }
            Err((hashed, problem)) => {
                if let Some(bytes) = hashed {
                    report.files_hashed += 1;
                    report.bytes_hashed += bytes;
                }
                record.remove(&u.file);
                report.damaged.push(Damage {
                    file: path,
                    problem,
                });
            }
        }
    }
    if record != old {
        report.record_error = write_record(split_dir, record).err().map(|e| e.to_string());
    }
    report
}

type UnitResult = std::result::Result<(Stamp, Option<u64>), (Option<u64>, String)>;

/// One unit: `Ok((stamp, bytes hashed if it was hashed))`, or the problem. A file `vouched`
/// for by its stamp in the record is not hashed.
fn check_unit(
    path: &Path,
    m: &Manifest,
    u: &UnitEntry,
    vouched: Option<&Stamp>,
    buf: &mut Vec<u8>,
    keep_cache: bool,
) -> UnitResult {
    let f = match fsutil::open_regular(path) {
        Ok(f) => f,
        Err(SplitError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err((None, format!("missing (unit {})", u.name)))
        }
        Err(SplitError::NotAFile { kind, .. }) => {
            return Err((None, format!("is {kind}, not a regular file")))
        }
        Err(SplitError::Io { source, .. }) => return Err((None, format!("cannot open: {source}"))),
        Err(e) => return Err((None, format!("cannot open: {e}"))),
    };
    let md = f
        .metadata()
        .map_err(|e| (None, format!("cannot stat: {e}")))?;
    check_header(path, &f, md.len(), m, u).map_err(|p| (None, p))?;
    if let Some(stamp) = vouched.filter(|s| s.vouches_for(&md, &u.checksum)) {
        return Ok((stamp.clone(), None));
    }
    let (read, sum) = checksum_file(&f, path, buf, keep_cache)
        .map_err(|e| (None, format!("cannot read: {e}")))?;
    if read != u.size {
        return Err((
            Some(read),
            format!("read {read} bytes, expected {}", u.size),
        ));
    }
    if sum != u.checksum {
        return Err((
            Some(read),
            format!(
                "checksum mismatch: file has {sum}, manifest says {} (corrupted data)",
                u.checksum
            ),
        ));
    }
    // The identity from before the read: a change during the read shows up next time.
    Ok((Stamp::of(&md, &u.checksum), Some(read)))
}

/// The cheap checks of one open unit file of `len` bytes: size, and its header against the
/// manifest entry. `Err` is the problem, for a [`Damage`].
pub(crate) fn check_header(
    path: &Path,
    f: &File,
    len: u64,
    m: &Manifest,
    u: &UnitEntry,
) -> std::result::Result<(), String> {
    if len != u.size {
        return Err(format!(
            "size is {len} bytes but the manifest says {} (truncated or replaced?)",
            u.size
        ));
    }
    let h = read_safetensors_header(path, f).map_err(|e| format!("unreadable header: {e}"))?;
    if h.data_offset() != u.data_offset {
        return Err(format!(
            "data region starts at {} but the manifest says {}",
            h.data_offset(),
            u.data_offset
        ));
    }
    if h.data_offset() % m.options.alignment != 0 {
        return Err(format!("data region at {} is not aligned", h.data_offset()));
    }
    let meta = |k: &str| h.metadata.get(k).map(String::as_str);
    if meta("format") != Some(FORMAT_NAME)
        || meta("format_version") != Some(&FORMAT_VERSION.to_string())
        || meta("source_fingerprint") != Some(&m.source_fingerprint)
    {
        return Err(
            "header metadata does not match the manifest (file from another model or split?)"
                .into(),
        );
    }
    if meta("unit") != Some(&u.name) {
        return Err(format!(
            "holds unit {} but the manifest puts unit {} here (files swapped or renamed?)",
            meta("unit").unwrap_or("(none)"),
            u.name
        ));
    }
    if h.tensors.len() != u.tensors.len() {
        return Err(format!(
            "the header differs from the manifest: {} tensors instead of {}",
            h.tensors.len(),
            u.tensors.len()
        ));
    }
    for (a, b) in h.tensors.iter().zip(&u.tensors) {
        if a.name != b.name || a.dtype != b.dtype || a.shape != b.shape {
            return Err(format!(
                "the header differs from the manifest: tensor {} ({} {:?}) where the manifest \
                 has {} ({} {:?})",
                a.name, a.dtype, a.shape, b.name, b.dtype, b.shape
            ));
        }
        if a.start != b.offset || a.end - a.start != b.len {
            return Err(format!(
                "the header differs from the manifest: tensor {} is at [{}, {}), the manifest \
                 says [{}, {})",
                a.name,
                a.start,
                a.end,
                b.offset,
                b.offset + b.len
            ));
        }
    }
    Ok(())
}
