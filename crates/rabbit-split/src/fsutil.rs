//! Small durable-filesystem helpers: directory fsync, atomic small-file writes, free space and an
//! advisory lock, so the crash-safety protocol lives in one place.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, SplitError};

/// Appends `.tmp` to a path: where a file is written before its atomic rename.
pub(crate) fn tmp_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
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

/// Writes a small file atomically: `<path>.tmp`, fsync, rename, fsync of the directory. A crash
/// leaves either the old file, the new file, or a stray `.tmp` — never a partial `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| {
        let mut f = File::create(&tmp).map_err(|e| SplitError::io(&tmp, e))?;
        crate::testing::check_write(bytes.len())
            .and_then(|()| f.write_all(bytes))
            .map_err(|e| SplitError::io(&tmp, e))?;
        f.sync_all().map_err(|e| SplitError::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| SplitError::io(path, e))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    sync_dir(parent_dir(path))
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
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        SplitError::io(
            dir,
            io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
        )
    })?;
    // SAFETY: statvfs only writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(SplitError::io(dir, io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
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
            // SAFETY: flock on a valid, owned file descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(DirLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(SplitError::io(dir, err));
            }
        }
    }
}

/// Tells the kernel we will not read `file` again soon (after it was fsynced), so splitting a
/// checkpoint much larger than RAM does not evict everything else from the page cache.
pub(crate) fn drop_cache(file: &File) {
    #[cfg(target_os = "linux")]
    // SAFETY: advisory call on a valid descriptor; failure is harmless.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Hints sequential access on a source file (bigger kernel readahead).
pub(crate) fn advise_sequential(file: &File) {
    #[cfg(target_os = "linux")]
    // SAFETY: advisory call on a valid descriptor; failure is harmless.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Reserves `len` bytes for a file being written so a full disk is reported up front and the file
/// is laid out contiguously. Filesystems without `fallocate` are simply skipped.
pub(crate) fn preallocate(file: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid descriptor with mode 0 (allocate and extend).
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(()),
                _ => Err(err),
            };
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, len);
        Ok(())
    }
}
