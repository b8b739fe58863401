//! Small durable-filesystem helpers, so the crash-safety rules live in one place: the one
//! atomic-write helper of the project ([`AtomicFile`], [`write_atomic`]), opening only regular
//! files ([`open_regular`]: a FIFO or device in place of a file must fail, not block), directory
//! fsync, free space and an advisory directory lock.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Advice, FallocateFlags, FlockOperation, OFlags};
use rustix::io::Errno;

use crate::error::{Result, SplitError};

/// Suffix of every temporary file [`AtomicFile`] creates.
pub const TEMP_SUFFIX: &str = ".tmp";
/// Random characters in a temporary file name.
const TEMP_RAND: usize = 6;

/// What a non-regular file is, for messages.
pub(crate) fn file_kind(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading only if it is a regular file (symlinks followed). The open itself
/// never blocks: it uses `O_NONBLOCK`, so a FIFO in place of a file is reported instead of
/// waiting forever for a writer; the flag is cleared again on the regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    open_regular_with_flags(path, 0)
}

/// [`open_regular`] with extra `open(2)` flags (e.g. `O_DIRECT`). An `EINVAL` from the open
/// comes back as [`SplitError::Io`] with that OS error, so callers can fall back.
pub fn open_regular_with_flags(path: &Path, flags: i32) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags | OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| SplitError::io(path, e))?;
    check_regular(path, &file)?;
    let fl = rustix::fs::fcntl_getfl(&file).map_err(|e| SplitError::io(path, e.into()))?;
    rustix::fs::fcntl_setfl(&file, fl - OFlags::NONBLOCK)
        .map_err(|e| SplitError::io(path, e.into()))?;
    Ok(file)
}

/// Fails with [`SplitError::NotAFile`] unless the open `file` is a regular file.
pub fn check_regular(path: &Path, file: &File) -> Result<()> {
    let ft = file
        .metadata()
        .map_err(|e| SplitError::io(path, e))?
        .file_type();
    if ft.is_file() {
        Ok(())
    } else {
        Err(SplitError::NotAFile {
            path: path.to_path_buf(),
            kind: file_kind(ft),
        })
    }
}

/// Like [`fs::read`], through [`open_regular`]: `Ok(None)` when the file does not exist.
pub fn read_regular(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut f = match open_regular(path) {
        Ok(f) => f,
        Err(SplitError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| SplitError::io(path, e))?;
    Ok(Some(bytes))
}

/// A file being written under a unique temporary name in the directory of its final path
/// (`.<name>.XXXXXX.tmp`), renamed into place by [`commit`](Self::commit): fsync of the file,
/// rename, fsync of the directory. Until then the final path is untouched (an existing file of
/// that name, or of any other name, is never overwritten or truncated early); dropping it
/// uncommitted — an error, a panic — removes the temporary file. A crash leaves either the old
/// file or the new one, plus at most a stray temporary that [`temp_target`] recognizes.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    final_path: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file next to `final_path` (permissions as [`File::create`] gives:
    /// `0o666` less the umask).
    pub fn create(final_path: &Path) -> Result<AtomicFile> {
        let dir = parent_dir(final_path);
        let name = final_path.file_name().ok_or_else(|| {
            SplitError::io(
                final_path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?;
        let mut prefix = OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(TEMP_SUFFIX)
            .rand_bytes(TEMP_RAND)
            .permissions(Permissions::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(|e| SplitError::io(dir, e))?;
        Ok(AtomicFile {
            tmp,
            final_path: final_path.to_path_buf(),
        })
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// Path of the temporary file.
    pub fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// The path the file gets on [`commit`](Self::commit).
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// fsyncs the file, renames it to its final path (replacing a file of that name) and fsyncs
    /// the directory: only then does the final path hold the new bytes, durably.
    pub fn commit(self) -> Result<()> {
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| SplitError::io(self.tmp.path(), e))?;
        let final_path = self.final_path;
        self.tmp
            .persist(&final_path)
            .map_err(|e| SplitError::io(&final_path, e.error))?;
        sync_dir(parent_dir(&final_path))
    }
}

/// Writes a file atomically with [`AtomicFile`]: a crash or an error leaves either the old file
/// or the new one at `path`, never a partial one, and no temporary after an error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let f = AtomicFile::create(path)?;
    crate::testing::check_write(bytes.len())
        .and_then(|()| f.file().write_all(bytes))
        .map_err(|e| SplitError::io(f.tmp_path(), e))?;
    f.commit()
}

/// The final file name a temporary name of [`AtomicFile`] belongs to (`.x.json.AbC123.tmp` ->
/// `x.json`), for cleaning up after a crash; `None` for any other name.
pub fn temp_target(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('.')?.strip_suffix(TEMP_SUFFIX)?;
    let (target, rand) = inner.rsplit_once('.')?;
    (!target.is_empty()
        && rand.len() == TEMP_RAND
        && rand.bytes().all(|b| b.is_ascii_alphanumeric()))
    .then_some(target)
}

/// fsyncs a directory so a rename or unlink inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| SplitError::io(dir, e))?;
    d.sync_all().map_err(|e| SplitError::io(dir, e))
}

/// The directory containing `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Removes a file if it exists.
pub(crate) fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SplitError::io(path, e)),
    }
}

/// Bytes available to unprivileged users on the filesystem holding `dir`.
pub(crate) fn available_space(dir: &Path) -> Result<u64> {
    if let Some(v) = crate::testing::available_space_override() {
        return Ok(v);
    }
    let st = rustix::fs::statvfs(dir).map_err(|e| SplitError::io(dir, e.into()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// An exclusive advisory lock on a directory, held until dropped: two processes splitting into the
/// same directory take turns instead of interleaving writes.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Blocks until the lock on `dir` is acquired.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock> {
        let file = File::open(dir).map_err(|e| SplitError::io(dir, e))?;
        loop {
            match rustix::fs::flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(Errno::INTR) => {}
                Err(e) => return Err(SplitError::io(dir, e.into())),
            }
        }
    }
}

impl DirLock {
    /// Takes the lock on `dir` if no one holds it; `None` when someone does.
    pub(crate) fn try_acquire(dir: &Path) -> Result<Option<DirLock>> {
        let file = File::open(dir).map_err(|e| SplitError::io(dir, e))?;
        loop {
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Some(DirLock { _file: file })),
                Err(Errno::WOULDBLOCK) => return Ok(None),
                Err(Errno::INTR) => {}
                Err(e) => return Err(SplitError::io(dir, e.into())),
            }
        }
    }
}

/// Tells the kernel we will not read `file` again soon (after it was fsynced), so splitting a
/// checkpoint much larger than RAM does not evict everything else from the page cache.
pub(crate) fn drop_cache(file: &File) {
    // Advisory: failure is harmless.
    let _ = rustix::fs::fadvise(file, 0, None, Advice::DontNeed);
}

/// Hints sequential access on a source file (bigger kernel readahead).
pub(crate) fn advise_sequential(file: &File) {
    // Advisory: failure is harmless.
    let _ = rustix::fs::fadvise(file, 0, None, Advice::Sequential);
}

/// Reserves `len` bytes for a file being written so a full disk is reported up front and the file
/// is laid out contiguously. Filesystems without `fallocate` are simply skipped.
pub(crate) fn preallocate(file: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) | Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_never_touches_other_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // The old helper wrote `<path>.tmp`, destroying a user file of that name.
        fs::write(dir.path().join("run.st.tmp"), b"mine").unwrap();
        fs::write(dir.path().join("run.tmp"), b"mine too").unwrap();
        let target = dir.path().join("run.st");
        write_atomic(&target, b"one").unwrap();
        write_atomic(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::read(dir.path().join("run.st.tmp")).unwrap(), b"mine");
        assert_eq!(fs::read(dir.path().join("run.tmp")).unwrap(), b"mine too");
        assert_eq!(names(dir.path()), ["run.st", "run.st.tmp", "run.tmp"]);
        // Same permissions as File::create.
        let plain = dir.path().join("plain");
        File::create(&plain).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), mode(&plain));
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.json");
        fs::write(&target, b"old").unwrap();
        crate::testing::fail_writes_after(Some(2));
        let e = write_atomic(&target, b"new bytes").unwrap_err();
        crate::testing::fail_writes_after(None);
        assert!(matches!(e, SplitError::DiskFull { .. }), "{e:?}");
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["m.json"]);
        // Uncommitted: dropped, nothing left; the final path is never created early.
        let f = AtomicFile::create(&dir.path().join("new.bin")).unwrap();
        let tmp = f.tmp_path().to_path_buf();
        assert_eq!(
            temp_target(tmp.file_name().unwrap().to_str().unwrap()),
            Some("new.bin")
        );
        assert!(!dir.path().join("new.bin").exists());
        drop(f);
        assert!(!tmp.exists());
        // A missing directory is named.
        let e = write_atomic(&dir.path().join("no/such/x"), b"1").unwrap_err();
        assert!(e.to_string().contains("no/such"), "{e}");
    }

    #[test]
    fn temp_names_are_recognized_and_nothing_else() {
        assert_eq!(
            temp_target(".layer.000.safetensors.aB3xY9.tmp"),
            Some("layer.000.safetensors")
        );
        for other in [
            "layer.000.safetensors.tmp",
            ".x.tmp",
            "x.aB3xY9.tmp",
            ".x.aB3x.tmp",
            ".x.a-3xY9.tmp",
        ] {
            assert_eq!(temp_target(other), None, "{other}");
        }
    }

    #[test]
    fn only_regular_files_open_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let e = open_regular(&fifo).unwrap_err();
        assert!(matches!(e, SplitError::NotAFile { .. }), "{e:?}");
        assert!(
            e.to_string().contains("pipe") && e.to_string().contains("FIFO"),
            "{e}"
        );
        let e = open_regular(dir.path()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let e = open_regular(&looped).unwrap_err();
        assert!(e.to_string().contains("loop"), "{e}");
        let file = dir.path().join("f");
        fs::write(&file, b"abc").unwrap();
        let f = open_regular(&file).unwrap();
        let fl = rustix::fs::fcntl_getfl(&f).unwrap();
        assert!(!fl.contains(OFlags::NONBLOCK));
        assert_eq!(read_regular(&file).unwrap().unwrap(), b"abc");
        assert_eq!(read_regular(&dir.path().join("none")).unwrap(), None);
    }
}
