//! Fault injection for tests (hidden from the docs). The hooks are thread-local, so tests running
//! in parallel threads of one process do not disturb each other; the splitter does all its
//! writing on the calling thread.

use std::cell::Cell;
use std::io;

thread_local! {
    static WRITE_BUDGET: Cell<Option<u64>> = const { Cell::new(None) };
    static AVAILABLE: Cell<Option<u64>> = const { Cell::new(None) };
    static CLOCK_SKEW: Cell<i64> = const { Cell::new(0) };
}

/// Shifts the clock the integrity record uses on this thread by `secs`: with a few seconds,
/// files just written count as settled, as they would be on a later run.
pub fn skew_clock(secs: i64) {
    CLOCK_SKEW.with(|c| c.set(secs));
}

/// Seconds since the Unix epoch, as the integrity record sees them.
pub(crate) fn now_secs() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now + CLOCK_SKEW.with(Cell::get)
}

/// After `bytes` more bytes are written on this thread, every write fails with ENOSPC (the last
/// write before that may be partial), as on a full disk. `None` removes the limit.
pub fn fail_writes_after(bytes: Option<u64>) {
    WRITE_BUDGET.with(|b| b.set(bytes));
}

/// Makes the free-space check on this thread see `bytes` available instead of asking statvfs.
pub fn override_available_space(bytes: Option<u64>) {
    AVAILABLE.with(|a| a.set(bytes));
}

pub(crate) fn available_space_override() -> Option<u64> {
    AVAILABLE.with(Cell::get)
}

/// How many of `len` bytes may be written now; `Err(ENOSPC)` when the budget is exhausted.
pub(crate) fn allowed(len: usize) -> io::Result<usize> {
    WRITE_BUDGET.with(|b| match b.get() {
        None => Ok(len),
        Some(0) if len > 0 => Err(io::Error::from(rustix::io::Errno::NOSPC)),
        Some(left) => {
            let n = (len as u64).min(left);
            b.set(Some(left - n));
            Ok(n as usize)
        }
    })
}

/// All-or-nothing variant of [`allowed`] for small files written in one call.
pub(crate) fn check_write(len: usize) -> io::Result<()> {
    WRITE_BUDGET.with(|b| match b.get() {
        Some(left) if (len as u64) > left => {
            b.set(Some(0));
            Err(io::Error::from(rustix::io::Errno::NOSPC))
        }
        Some(left) => {
            b.set(Some(left - len as u64));
            Ok(())
        }
        None => Ok(()),
    })
}
