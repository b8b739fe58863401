//! The background layer reader: fetches layers i+1..i+k while layer i computes.
//!
//! A unit is a region made of extents, byte ranges of files ([`UnitRegion`]): a split unit's data
//! region is one extent; streamed in place, a layer is the ranges of the original shards holding
//! its tensors (one or two, usually). Each file is opened once and its size and modification
//! time checked before every read (module `extent`).
//!
//! Ways to fetch a unit, all bounded to `depth + 1` layers in host memory:
//! - [`ReadMode::Copy`]: one sequential `pread` per extent into a recycled
//!   [`AlignedBuf`] (buffers travel to the compute thread over a bounded crossbeam channel and
//!   come back when the layer is done: steady-state decoding allocates nothing). Needed when the
//!   bytes go on to a device.
//! - [`ReadMode::Map`]: each extent is mmapped, pages not in the page cache faulted in by the
//!   reader thread (`MAP_POPULATE`), and the CPU kernels read the page cache directly: no memcpy
//!   at all, which on a 2-core machine is the difference between the reader stealing a core and
//!   not. By default ([`LayerReader::set_keep_mappings`]) the mappings are kept from one sweep to
//!   the next: mapping, unmapping and faulting a layer's pages every sweep was the whole cost of
//!   streaming from the page cache (1.3–2× the resident decode step; kept, ≤ 1.1×). Kept
//!   mappings count the cached file pages in RSS (they are page cache, clean, reclaimable, and
//!   cached either way); each sweep the reader checks the files and reads back pages the kernel
//!   dropped, ahead of compute. Without keeping, each mapping is dropped (munmap) after its
//!   layer.
//! - [`ReadMode::Direct`]: like `Copy`, with the files opened `O_DIRECT`: the bytes go from the
//!   disk into the buffer without passing through (and evicting) the page cache, for models
//!   larger than RAM. Where the file system refuses `O_DIRECT` (tmpfs, some overlays) the reader
//!   falls back to buffered reads of the same buffers, with a warning.
//!
//! The reader cycles through its units forever (token after token) until it is dropped.

mod experts;
mod extent;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use rabbit_split::manifest::UnitEntry;
use rabbit_split::UnitRegion;

use crate::buffer::AlignedBuf;
use crate::error::{CoreError, Result};
pub use experts::{PartReader, ReadPart};
use extent::{
    map_populated, map_source, mapped_len, open_sources, read_source, refresh_source, unmap_pages,
    OpenFile, Source,
};
pub use extent::{LoadedUnit, MappedExtent, UnitBytes};

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

/// A prefetching reader over a fixed cycle of units.
pub struct LayerReader {
    rx: Receiver<Result<LoadedUnit>>,
    free_tx: Sender<AlignedBuf>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    cycle_len: usize,
    /// Each unit's file ranges, for dropping its pages from the page cache.
    regions: Vec<Vec<(Arc<OpenFile>, u64, u64)>>,
    /// When set, each unit's pages are dropped from the page cache once it has been used, so
    /// every sweep reads from the disk (benchmarks of models larger than RAM).
    evicting: bool,
    /// Whether mappings should be kept between sweeps (mapped mode), evicting or not.
    keep_wanted: bool,
    /// Whether the reader keeps its mappings now (`keep_wanted` and not evicting).
    keep: Arc<AtomicBool>,
    /// Bytes of the mappings it keeps.
    kept_bytes: Arc<AtomicU64>,
}

impl LayerReader {
    /// Opens every unit file of a split and starts the reader thread with `depth` layers of
    /// read-ahead.
    pub fn start(
        dir: &Path,
        units: &[&UnitEntry],
        depth: usize,
        mode: ReadMode,
    ) -> Result<LayerReader> {
        let regions: Vec<UnitRegion> = units
            .iter()
            .map(|u| UnitRegion::of_split_unit(dir, u))
            .collect();
        let refs: Vec<&UnitRegion> = regions.iter().collect();
        Self::start_regions(&refs, depth, mode, false, mode == ReadMode::Map)
    }

    /// Starts the reader over units described by their regions (split units, or ranges of the
    /// original shards when `original`, which only changes the messages); in mapped mode it keeps
    /// the mappings between sweeps when `keep_mappings` ([`LayerReader::set_keep_mappings`]).
    pub fn start_regions(
        regions: &[&UnitRegion],
        depth: usize,
        mode: ReadMode,
        original: bool,
        keep_mappings: bool,
    ) -> Result<LayerReader> {
        if regions.is_empty() {
            return Err(CoreError::InvalidInput(
                "layer reader started with no units".into(),
            ));
        }
        let (files, sources) = open_sources(regions, mode, original)?;
        let max_len = sources.iter().map(|s| s.len).max().unwrap_or(0).max(1);
        let evict: Vec<Vec<(Arc<OpenFile>, u64, u64)>> = sources
            .iter()
            .map(|s| {
                s.extents
                    .iter()
                    .map(|e| (files[e.file].clone(), e.offset, e.len as u64))
                    .collect()
            })
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
        let keep_mappings = keep_mappings && mode == ReadMode::Map;
        let keep = Arc::new(AtomicBool::new(keep_mappings));
        let kept_bytes = Arc::new(AtomicU64::new(0));
        let shared = Shared {
            stop: stop.clone(),
            keep: keep.clone(),
            kept_bytes: kept_bytes.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("rabbit-reader".into())
            .spawn(move || read_loop(files, sources, mode, tx, free_rx, shared))
            .map_err(|e| CoreError::Reader(format!("cannot start thread: {e}")))?;
        Ok(LayerReader {
            rx,
            free_tx,
            stop,
            handle: Some(handle),
            cycle_len: regions.len(),
            regions: evict,
            evicting: false,
            keep_wanted: keep_mappings,
            keep,
            kept_bytes,
        })
    }

    /// Mapped mode: keep each unit's mappings from one sweep to the next, or map and unmap
    /// every unit every sweep. Takes effect as each unit comes round; while evicting
    /// ([`LayerReader::set_evict`]) nothing is kept.
    pub fn set_keep_mappings(&mut self, on: bool) {
        self.keep_wanted = on;
        self.keep.store(on && !self.evicting, Ordering::SeqCst);
    }

    /// Bytes of the mappings the reader keeps between sweeps now (file pages, counted in RSS).
    pub fn kept_mapped_bytes(&self) -> u64 {
        self.kept_bytes.load(Ordering::SeqCst)
    }
    /// Turns page-cache eviction after use on or off (see [`LayerReader`]'s `evicting` field).
    /// Evicting, no mapping is kept: the model is read as one larger than RAM is, mapped and
    /// populated by the reader every sweep.
    pub fn set_evict(&mut self, on: bool) {
        self.evicting = on;
        self.keep.store(self.keep_wanted && !on, Ordering::SeqCst);
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

    /// Returns a unit's bytes once its tensors are gone: buffers go back to the reader; a
    /// mapping is unmapped unless the reader keeps it for the next sweep.
    pub fn recycle(&self, slot: usize, bytes: UnitBytes) {
        match bytes {
            UnitBytes::Buf(buf) => {
                // The channel has room for every buffer ever created; failure means the thread
                // is gone, and then the buffer is simply freed.
                let _ = self.free_tx.try_send(buf);
            }
            UnitBytes::Map(maps) => {
                // A mapping the reader keeps holds its pages in the page cache against
                // fadvise: unmap them first (the reader reads them back next sweep).
                if self.evicting {
                    unmap_pages(&maps);
                }
            }
        }
        if self.evicting {
            for (f, offset, len) in self.regions.get(slot).into_iter().flatten() {
                // Advisory: failure only means the pages stay cached.
                let _ = rustix::fs::fadvise(
                    &f.file,
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

/// What the reader thread shares with its [`LayerReader`].
struct Shared {
    stop: Arc<AtomicBool>,
    keep: Arc<AtomicBool>,
    kept_bytes: Arc<AtomicU64>,
}

fn read_loop(
    files: Vec<Arc<OpenFile>>,
    sources: Vec<Source>,
    mode: ReadMode,
    tx: Sender<Result<LoadedUnit>>,
    free_rx: Receiver<AlignedBuf>,
    shared: Shared,
) {
    let Shared {
        stop,
        keep,
        kept_bytes,
    } = shared;
    let mut kept: Vec<Option<Arc<Vec<MappedExtent>>>> = (0..sources.len()).map(|_| None).collect();
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
                read_source(&files, src, &mut buf).map(|()| LoadedUnit {
                    slot,
                    bytes: UnitBytes::Buf(buf),
                    bytes_read: src.bytes_read,
                    read_time: start.elapsed(),
                })
            }
            ReadMode::Map => {
                let start = Instant::now();
                let keeping = keep.load(Ordering::SeqCst);
                let maps = match kept[slot].take() {
                    Some(m) => {
                        kept_bytes.fetch_sub(mapped_len(&m), Ordering::SeqCst);
                        refresh_source(&files, src, &m).map(|()| m)
                    }
                    None => map_source(&files, src).map(Arc::new),
                };
                maps.map(|m| {
                    if keeping {
                        kept_bytes.fetch_add(mapped_len(&m), Ordering::SeqCst);
                        kept[slot] = Some(m.clone());
                    }
                    LoadedUnit {
                        slot,
                        bytes: UnitBytes::Map(m),
                        bytes_read: src.bytes_read,
                        read_time: start.elapsed(),
                    }
                })
            }
        };
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            // The kept mappings go with this thread.
            kept_bytes.store(0, Ordering::SeqCst);
            return;
        }
        slot = (slot + 1) % sources.len();
    }
    kept_bytes.store(0, Ordering::SeqCst);
}

/// Reads every unit of a split once, sequentially, the way the reader would (`mode`); see
/// [`measure_regions`].
pub fn measure_read(
    dir: &Path,
    units: &[&UnitEntry],
    mode: ReadMode,
    cold: bool,
) -> Result<(u64, f64)> {
    let regions: Vec<UnitRegion> = units
        .iter()
        .map(|u| UnitRegion::of_split_unit(dir, u))
        .collect();
    let refs: Vec<&UnitRegion> = regions.iter().collect();
    measure_regions(&refs, mode, cold)
}

/// Reads every region once, sequentially, the way the reader would (`mode`), and returns
/// `(bytes, seconds)`: the raw bandwidth of this machine's path for these files (mapped: every
/// page mapped and faulted in, the cost of a sweep that maps afresh). With `cold`, each file's
/// pages are dropped from the page cache first, so the figure is the disk's.
pub fn measure_regions(regions: &[&UnitRegion], mode: ReadMode, cold: bool) -> Result<(u64, f64)> {
    let (files, sources) = open_sources(regions, mode, false)?;
    if cold {
        for f in &files {
            // Advisory: failure only means the pages stay cached.
            let _ = rustix::fs::fadvise(&f.file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
    let mut buf = match mode {
        ReadMode::Copy | ReadMode::Direct => Some(AlignedBuf::new(
            sources.iter().map(|s| s.len).max().unwrap_or(1).max(1),
        )),
        ReadMode::Map => None,
    };
    let mut bytes = 0u64;
    let start = Instant::now();
    for s in &sources {
        match buf.as_mut() {
            Some(buf) => read_source(&files, s, buf)?,
            None => map_populated(&files, s)?,
        }
        bytes += s.bytes_read;
    }
    Ok((bytes, start.elapsed().as_secs_f64()))
}
