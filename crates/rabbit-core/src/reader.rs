//! The background layer reader: fetches layer files i+1..i+k while layer i computes.
//!
//! Two ways to fetch a unit, both bounded to `depth + 1` layers in host memory:
//! - [`ReadMode::Copy`]: one sequential `pread` of the whole data region into a recycled
//!   [`AlignedBuf`] (buffers travel to the compute thread over a bounded crossbeam channel and
//!   come back when the layer is done: steady-state decoding allocates nothing). Needed when the
//!   bytes go on to a device.
//! - [`ReadMode::Map`]: the region is mmapped with `MAP_POPULATE`, so the reader thread faults the
//!   pages in (reading from disk if they are not cached) and the CPU kernels read the page cache
//!   directly: no memcpy at all, which on a 2-core machine is the difference between the reader
//!   stealing a core and not. The mapping is dropped (munmap) after the layer, so mapped pages
//!   never pile up in RSS.
//!
//! - [`ReadMode::Direct`]: like `Copy`, with the files opened `O_DIRECT`: the bytes go from the
//!   disk into the buffer without passing through (and evicting) the page cache, for models
//!   larger than RAM. Where the file system refuses `O_DIRECT` (tmpfs, some overlays) the reader
//!   falls back to buffered reads of the same buffers, with a warning.
//!
//! The reader cycles through its units forever (token after token) until it is dropped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use rabbit_split::manifest::UnitEntry;
use rabbit_split::{fsutil, SplitError};

use crate::buffer::AlignedBuf;
use crate::error::{CoreError, Result};

/// How the reader fetches units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// pread into recycled page-aligned buffers.
    Copy,
    /// mmap + populate, viewed in place.
    Map,
    /// pread with `O_DIRECT` (page cache bypassed) into recycled page-aligned buffers.
    Direct,
}

impl ReadMode {
    /// The mode for a compute device: mapped views on the CPU, buffers a device copy can read
    /// from otherwise; `direct` asks for `O_DIRECT` buffers on either.
    pub fn for_device(device: tch::Device, direct: bool) -> ReadMode {
        if direct {
            ReadMode::Direct
        } else if device == tch::Device::Cpu {
            ReadMode::Map
        } else {
            ReadMode::Copy
        }
    }
}

/// Alignment `O_DIRECT` needs of offsets, lengths and buffer addresses (the largest logical block
/// size in use; the split aligns data regions to it).
const DIRECT_ALIGN: u64 = 4096;

/// Opens a unit file for `mode`: `O_DIRECT` when asked and the file system allows it. Only a
/// regular file opens (a FIFO in its place would block the reader forever).
fn open_unit(path: &Path, mode: ReadMode, offset: u64) -> Result<(File, bool)> {
    if mode == ReadMode::Direct && offset.is_multiple_of(DIRECT_ALIGN) {
        let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
        match fsutil::open_regular_with_flags(path, direct) {
            Ok(f) => return Ok((f, true)),
            Err(SplitError::Io { source, .. })
                if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                tracing::warn!(
                    file = %path.display(),
                    "the file system does not support O_DIRECT; reading through the page cache"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((fsutil::open_regular(path)?, false))
}

/// The bytes of one unit's data region.
pub enum UnitBytes {
    /// Read into a recycled buffer.
    Buf(AlignedBuf),
    /// Mapped from the file.
    Map(memmap2::Mmap),
}

impl UnitBytes {
    /// The data region (tensor offsets are relative to its start).
    pub fn as_slice(&self) -> &[u8] {
        match self {
            UnitBytes::Buf(b) => b.as_slice(),
            UnitBytes::Map(m) => m,
        }
    }
}

/// One unit's data region, read and ready.
pub struct LoadedUnit {
    /// Position of the unit in the reader's cycle.
    pub slot: usize,
    /// The data region.
    pub bytes: UnitBytes,
    /// Time spent reading (or faulting in) the region.
    pub read_time: Duration,
}

struct Source {
    path: PathBuf,
    file: Arc<File>,
    offset: u64,
    len: usize,
    /// Opened with `O_DIRECT`: reads must be aligned.
    direct: bool,
}

/// A prefetching reader over a fixed cycle of unit files.
pub struct LayerReader {
    rx: Receiver<Result<LoadedUnit>>,
    free_tx: Sender<AlignedBuf>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    cycle_len: usize,
    /// Each unit's file and data range, for dropping its pages from the page cache.
    regions: Vec<(Arc<File>, u64, u64)>,
    /// When set, each unit's pages are dropped from the page cache once it has been used, so
    /// every sweep reads from the disk (benchmarks of models larger than RAM).
    evicting: bool,
}

impl LayerReader {
    /// Opens every unit file and starts the reader thread with `depth` layers of read-ahead.
    pub fn start(
        dir: &Path,
        units: &[&UnitEntry],
        depth: usize,
        mode: ReadMode,
    ) -> Result<LayerReader> {
        if units.is_empty() {
            return Err(CoreError::InvalidInput(
                "layer reader started with no units".into(),
            ));
        }
        let mut sources = Vec::with_capacity(units.len());
        let mut max_len = 0usize;
        for u in units {
            let path = dir.join(&u.file);
            let (file, direct) = open_unit(&path, mode, u.data_offset)?;
            let len = usize::try_from(u.data_len).map_err(|_| {
                CoreError::InvalidInput(format!("{}: unit too large", path.display()))
            })?;
            max_len = max_len.max(len);
            sources.push(Source {
                path,
                file: Arc::new(file),
                offset: u.data_offset,
                len,
                direct,
            });
        }
        let regions: Vec<(Arc<File>, u64, u64)> = sources
            .iter()
            .map(|s| (s.file.clone(), s.offset, s.len as u64))
            .collect();
        let depth = depth.max(1);
        let (tx, rx) = bounded::<Result<LoadedUnit>>(depth);
        // depth buffers may sit in the channel, one is being filled, one is being computed on.
        // Mapped reads need none: allocating them anyway would cost depth + 1 layers of RSS
        // (aligned zeroed allocations are written, so every page is resident).
        let (free_tx, free_rx) = bounded::<AlignedBuf>(depth + 2);
        if mode != ReadMode::Map {
            for _ in 0..depth + 1 {
                free_tx
                    .send(AlignedBuf::new(max_len))
                    .expect("fresh channel has room");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let handle = std::thread::Builder::new()
            .name("rabbit-reader".into())
            .spawn(move || read_loop(sources, mode, tx, free_rx, stop_thread))
            .map_err(|e| CoreError::Reader(format!("cannot start thread: {e}")))?;
        Ok(LayerReader {
            rx,
            free_tx,
            stop,
            handle: Some(handle),
            cycle_len: units.len(),
            regions,
            evicting: false,
        })
    }

    /// Turns page-cache eviction after use on or off (see [`LayerReader`]'s `evicting` field).
    pub fn set_evict(&mut self, on: bool) {
        self.evicting = on;
    }

    /// Number of units in the cycle.
    pub fn cycle_len(&self) -> usize {
        self.cycle_len
    }

    /// Blocks until unit `slot` is read. Units arrive in cycle order; if the caller skipped some
    /// (an error aborted a sweep), the stale ones are recycled until `slot` comes round.
    /// Returns the unit and the time spent waiting.
    pub fn next(&mut self, slot: usize) -> Result<(LoadedUnit, Duration)> {
        let start = Instant::now();
        loop {
            let unit = self
                .rx
                .recv()
                .map_err(|_| CoreError::Reader("reader thread exited".into()))??;
            if unit.slot == slot {
                return Ok((unit, start.elapsed()));
            }
            self.recycle(unit.slot, unit.bytes);
        }
    }

    /// Returns a unit's bytes once its tensors are gone: buffers go back to the reader, maps
    /// are unmapped.
    pub fn recycle(&self, slot: usize, bytes: UnitBytes) {
        if let UnitBytes::Buf(buf) = bytes {
            // The channel has room for every buffer ever created; failure means the thread is
            // gone, and then the buffer is simply freed.
            let _ = self.free_tx.try_send(buf);
        } else {
            drop(bytes);
        }
        if self.evicting {
            if let Some((file, offset, len)) = self.regions.get(slot) {
                // Advisory: failure only means the pages stay cached.
                let _ = rustix::fs::fadvise(
                    file,
                    *offset,
                    std::num::NonZeroU64::new(*len),
                    rustix::fs::Advice::DontNeed,
                );
            }
        }
    }
}

impl Drop for LayerReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock the thread whichever channel it waits on: drain results so a blocked send
        // returns, and the closed free channel ends a blocked recv.
        while self.rx.try_recv().is_ok() {}
        let (dummy_tx, _) = bounded(1);
        drop(std::mem::replace(&mut self.free_tx, dummy_tx));
        while self.rx.try_recv().is_ok() {}
        if let Some(h) = self.handle.take() {
            // The thread checks `stop` after every read; drain until it exits.
            while !h.is_finished() {
                while self.rx.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.join();
        }
    }
}

fn read_loop(
    sources: Vec<Source>,
    mode: ReadMode,
    tx: Sender<Result<LoadedUnit>>,
    free_rx: Receiver<AlignedBuf>,
    stop: Arc<AtomicBool>,
) {
    let mut slot = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let src = &sources[slot];
        let result = match mode {
            ReadMode::Copy | ReadMode::Direct => {
                let Ok(mut buf) = free_rx.recv() else { return };
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let start = Instant::now();
                read_region(src, &mut buf).map(|()| LoadedUnit {
                    slot,
                    bytes: UnitBytes::Buf(buf),
                    read_time: start.elapsed(),
                })
            }
            ReadMode::Map => {
                let start = Instant::now();
                map_region(src).map(|m| LoadedUnit {
                    slot,
                    bytes: UnitBytes::Map(m),
                    read_time: start.elapsed(),
                })
            }
        };
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
        slot = (slot + 1) % sources.len();
    }
}

fn map_region(src: &Source) -> Result<memmap2::Mmap> {
    let file_len = src
        .file
        .metadata()
        .map_err(|e| CoreError::io(&src.path, e))?
        .len();
    if file_len < src.offset + src.len as u64 {
        return Err(CoreError::truncated(&src.path));
    }
    let map = |populate: bool| {
        let mut opts = memmap2::MmapOptions::new();
        opts.offset(src.offset).len(src.len);
        if populate {
            opts.populate();
        }
        // SAFETY: split files are written once (tmp + rename) and never modified in place; a
        // file replaced by a new split is a new inode, so this mapping keeps the old bytes.
        unsafe { opts.map(&src.file) }.map_err(|e| CoreError::io(&src.path, e))
    };
    // Pages already in the page cache need no reading: leave them to be faulted in by the
    // compute threads (measured ~6% faster than populating them from this thread on a 2-core
    // machine). Pages not cached must be read now, ahead of compute: populate.
    let m = map(false)?;
    if all_cached(&m) {
        Ok(m)
    } else {
        drop(m);
        map(true)
    }
}

/// Whether every page of a mapping is resident in the page cache (`mincore`).
fn all_cached(m: &memmap2::Mmap) -> bool {
    let page = rustix::param::page_size().max(4096);
    let mut vec = vec![0u8; m.len().div_ceil(page)];
    // rustix has no mincore, hence libc.
    // SAFETY: the mapping is valid for m.len() bytes and page-aligned (mmap result); `vec` has
    // one byte per page.
    let rc = unsafe { libc::mincore(m.as_ptr() as *mut libc::c_void, m.len(), vec.as_mut_ptr()) };
    rc == 0 && vec.iter().all(|v| v & 1 == 1)
}

fn read_region(src: &Source, buf: &mut AlignedBuf) -> Result<()> {
    if src.direct {
        return read_region_direct(src, buf);
    }
    let dst = &mut buf.spare_mut()[..src.len];
    src.file
        .read_exact_at(dst, src.offset)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => CoreError::truncated(&src.path),
            _ => CoreError::io(&src.path, e),
        })?;
    buf.set_len(src.len);
    Ok(())
}

/// `O_DIRECT` read of a region: whole aligned blocks into the aligned buffer (its capacity is a
/// multiple of the alignment), up to the end of the region or of the file.
fn read_region_direct(src: &Source, buf: &mut AlignedBuf) -> Result<()> {
    let want = (src.len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let spare = buf.spare_mut();
    let want = (want as usize).min(spare.len());
    let mut got = 0usize;
    while got < src.len {
        match src
            .file
            .read_at(&mut spare[got..want], src.offset + got as u64)
        {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                // An unaligned short read is the end of the file (and another read from an
                // unaligned offset would be refused).
                if !(got as u64).is_multiple_of(DIRECT_ALIGN) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CoreError::io(&src.path, e)),
        }
    }
    if got < src.len {
        return Err(CoreError::truncated(&src.path));
    }
    buf.set_len(src.len);
    Ok(())
}

/// Reads every unit once, sequentially, the way the reader would (`mode`), and returns
/// `(bytes, seconds)`: the raw bandwidth of this machine's path for these files. With `cold`,
/// each file's pages are dropped from the page cache first, so the figure is the disk's.
pub fn measure_read(
    dir: &Path,
    units: &[&UnitEntry],
    mode: ReadMode,
    cold: bool,
) -> Result<(u64, f64)> {
    let mut sources = Vec::with_capacity(units.len());
    for u in units {
        let path = dir.join(&u.file);
        let (file, direct) = open_unit(&path, mode, u.data_offset)?;
        sources.push(Source {
            path,
            file: Arc::new(file),
            offset: u.data_offset,
            len: u.data_len as usize,
            direct,
        });
    }
    if cold {
        for s in &sources {
            // Advisory: failure only means the pages stay cached.
            let _ = rustix::fs::fadvise(&s.file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
    let mut buf = match mode {
        ReadMode::Copy | ReadMode::Direct => Some(AlignedBuf::new(
            sources.iter().map(|s| s.len).max().unwrap_or(1),
        )),
        ReadMode::Map => None,
    };
    let mut bytes = 0u64;
    let start = Instant::now();
    for s in &sources {
        match buf.as_mut() {
            Some(buf) => read_region(s, buf)?,
            None => drop(map_region(s)?),
        }
        bytes += s.len as u64;
    }
    Ok((bytes, start.elapsed().as_secs_f64()))
}
