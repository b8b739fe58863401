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
use rabbit_split::{fsutil, SplitError, UnitRegion};

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

// `read_extent_direct` reads whole blocks: buffers and in-place regions must be laid out on them
// (a region aligned less would let a block's tail overwrite the next extent).
const _: () = assert!((crate::buffer::BUFFER_ALIGN as u64).is_multiple_of(DIRECT_ALIGN));
const _: () = assert!(rabbit_split::in_place::REGION_ALIGN.is_multiple_of(DIRECT_ALIGN));

/// Opens a unit file for `mode`: `O_DIRECT` when asked, the reads are `aligned` and the file
/// system allows it. Only a
/// regular file opens (a FIFO in its place would block the reader forever).
fn open_unit(path: &Path, mode: ReadMode, aligned: bool) -> Result<(File, bool)> {
    if mode == ReadMode::Direct && aligned {
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

/// One mapped extent of a unit's region.
pub struct MappedExtent {
    map: memmap2::Mmap,
    /// Bytes of the mapping before the extent (mappings start on a page).
    skip: usize,
    region_offset: u64,
    len: u64,
}

/// The bytes of one unit's data region.
pub enum UnitBytes {
    /// Read into a recycled buffer (extents at their region positions).
    Buf(AlignedBuf),
    /// Mapped from the files, one mapping per extent.
    Map(Vec<MappedExtent>),
}

impl UnitBytes {
    /// Region bytes `offset..offset + len` (tensor offsets are region positions), or `None`
    /// when they lie outside the region or across two extents.
    pub fn get(&self, offset: u64, len: u64) -> Option<&[u8]> {
        if len == 0 {
            // An empty tensor has no bytes to find (its extent may have been skipped).
            return Some(&[]);
        }
        let end = offset.checked_add(len)?;
        match self {
            UnitBytes::Buf(b) => b
                .as_slice()
                .get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?),
            UnitBytes::Map(maps) => {
                let i = maps
                    .partition_point(|m| m.region_offset <= offset)
                    .checked_sub(1)?;
                let m = &maps[i];
                if end > m.region_offset + m.len {
                    return None;
                }
                let at = m.skip + (offset - m.region_offset) as usize;
                m.map.get(at..at + len as usize)
            }
        }
    }

    /// The whole region when it is one contiguous slice (a buffer, or a single mapping).
    pub fn as_contiguous(&self) -> Option<&[u8]> {
        match self {
            UnitBytes::Buf(b) => Some(b.as_slice()),
            UnitBytes::Map(maps) if maps.len() == 1 && maps[0].region_offset == 0 => {
                Some(&maps[0].map[maps[0].skip..])
            }
            UnitBytes::Map(_) => None,
        }
    }
}

/// One unit's data region, read and ready.
pub struct LoadedUnit {
    /// Position of the unit in the reader's cycle.
    pub slot: usize,
    /// The data region.
    pub bytes: UnitBytes,
    /// Bytes read from the files (the region without its alignment gaps).
    pub bytes_read: u64,
    /// Time spent reading (or faulting in) the region.
    pub read_time: Duration,
}

/// An open file the reader reads from, with its size and modification time when opened: a file
/// changed in place while the model runs is refused, not read half old, half new.
struct OpenFile {
    path: PathBuf,
    file: File,
    /// Opened with `O_DIRECT`: reads must be aligned.
    direct: bool,
    stamp: (u64, i64, i64),
    /// The file is an original checkpoint shard (streaming in place), not a split unit file:
    /// for messages.
    original: bool,
}

fn stamp_of(md: &std::fs::Metadata) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (md.len(), md.mtime(), md.mtime_nsec())
}

impl OpenFile {
    /// Fails when the file is now shorter than `need` bytes, or was modified since it was
    /// opened.
    fn check(&self, need: u64) -> Result<u64> {
        let md = self
            .file
            .metadata()
            .map_err(|e| CoreError::io(&self.path, e))?;
        if md.len() < need {
            return Err(self.truncated());
        }
        if stamp_of(&md) != self.stamp {
            return Err(CoreError::SourceChanged {
                path: self.path.clone(),
            });
        }
        Ok(md.len())
    }

    fn truncated(&self) -> CoreError {
        if self.original {
            CoreError::truncated_original(&self.path)
        } else {
            CoreError::truncated(&self.path)
        }
    }
}

/// One extent of a unit, its file an index into the reader's files.
struct SourceExtent {
    file: usize,
    offset: u64,
    len: usize,
    region_offset: usize,
}

struct Source {
    extents: Vec<SourceExtent>,
    /// Region length.
    len: usize,
    bytes_read: u64,
}

/// Opens every file of `regions` once (the same shard serves many units) and turns the regions
/// into sources. `O_DIRECT` is used for a file only when every extent read from it is aligned.
fn open_sources(
    regions: &[&UnitRegion],
    mode: ReadMode,
    original: bool,
) -> Result<(Vec<Arc<OpenFile>>, Vec<Source>)> {
    let mut index: std::collections::HashMap<&Path, usize> = std::collections::HashMap::new();
    let mut paths: Vec<(&Path, bool)> = Vec::new();
    for r in regions {
        for e in &r.extents {
            let aligned = e.file_offset.is_multiple_of(DIRECT_ALIGN);
            match index.get(e.file.as_path()) {
                Some(&i) => paths[i].1 &= aligned,
                None => {
                    index.insert(e.file.as_path(), paths.len());
                    paths.push((e.file.as_path(), aligned));
                }
            }
        }
    }
    let mut files = Vec::with_capacity(paths.len());
    for (path, aligned) in paths {
        let (file, direct) = open_unit(path, mode, aligned)?;
        let md = file.metadata().map_err(|e| CoreError::io(path, e))?;
        files.push(Arc::new(OpenFile {
            path: path.to_path_buf(),
            file,
            direct,
            stamp: stamp_of(&md),
            original,
        }));
    }
    let mut sources = Vec::with_capacity(regions.len());
    for r in regions {
        let too_large =
            || CoreError::InvalidInput(format!("{}: unit too large", r.extents[0].file.display()));
        let mut extents = Vec::with_capacity(r.extents.len());
        for e in r.extents.iter().filter(|e| e.len > 0) {
            extents.push(SourceExtent {
                file: index[e.file.as_path()],
                offset: e.file_offset,
                len: usize::try_from(e.len).map_err(|_| too_large())?,
                region_offset: usize::try_from(e.region_offset).map_err(|_| too_large())?,
            });
        }
        sources.push(Source {
            extents,
            len: usize::try_from(r.len).map_err(|_| too_large())?,
            bytes_read: r.bytes_read(),
        });
    }
    Ok((files, sources))
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
        Self::start_regions(&refs, depth, mode, false)
    }

    /// Starts the reader over units described by their regions (split units, or ranges of the
    /// original shards when `original`, which only changes the messages).
    pub fn start_regions(
        regions: &[&UnitRegion],
        depth: usize,
        mode: ReadMode,
        original: bool,
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
        let stop_thread = stop.clone();
        let handle = std::thread::Builder::new()
            .name("rabbit-reader".into())
            .spawn(move || read_loop(files, sources, mode, tx, free_rx, stop_thread))
            .map_err(|e| CoreError::Reader(format!("cannot start thread: {e}")))?;
        Ok(LayerReader {
            rx,
            free_tx,
            stop,
            handle: Some(handle),
            cycle_len: regions.len(),
            regions: evict,
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

fn read_loop(
    files: Vec<Arc<OpenFile>>,
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
                read_source(&files, src, &mut buf).map(|()| LoadedUnit {
                    slot,
                    bytes: UnitBytes::Buf(buf),
                    bytes_read: src.bytes_read,
                    read_time: start.elapsed(),
                })
            }
            ReadMode::Map => {
                let start = Instant::now();
                map_source(&files, src).map(|m| LoadedUnit {
                    slot,
                    bytes: UnitBytes::Map(m),
                    bytes_read: src.bytes_read,
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

fn map_source(files: &[Arc<OpenFile>], src: &Source) -> Result<Vec<MappedExtent>> {
    src.extents
        .iter()
        .map(|e| map_extent(&files[e.file], e))
        .collect()
}

fn map_extent(f: &OpenFile, e: &SourceExtent) -> Result<MappedExtent> {
    f.check(e.offset + e.len as u64)?;
    let page = rustix::param::page_size().max(1) as u64;
    let start = e.offset / page * page;
    let skip = (e.offset - start) as usize;
    let map = |populate: bool| {
        let mut opts = memmap2::MmapOptions::new();
        opts.offset(start).len(skip + e.len);
        if populate {
            opts.populate();
        }
        // SAFETY: split files are written once (tmp + rename) and never modified in place; a
        // file replaced by a new split is a new inode, so this mapping keeps the old bytes.
        // Original shards streamed in place are checked for changes (size, mtime) before every
        // mapping.
        unsafe { opts.map(&f.file) }.map_err(|err| CoreError::io(&f.path, err))
    };
    // Pages already in the page cache need no reading: leave them to be faulted in by the
    // compute threads (measured ~6% faster than populating them from this thread on a 2-core
    // machine). Pages not cached must be read now, ahead of compute: populate.
    let m = map(false)?;
    let m = if all_cached(&m) {
        m
    } else {
        drop(m);
        map(true)?
    };
    Ok(MappedExtent {
        map: m,
        skip,
        region_offset: e.region_offset as u64,
        len: e.len as u64,
    })
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

/// Reads every extent of a unit to its region position in `buf`.
fn read_source(files: &[Arc<OpenFile>], src: &Source, buf: &mut AlignedBuf) -> Result<()> {
    for e in &src.extents {
        let f = &files[e.file];
        f.check(e.offset + e.len as u64)?;
        if f.direct {
            read_extent_direct(f, e, buf)?;
        } else {
            let dst = &mut buf.spare_mut()[e.region_offset..e.region_offset + e.len];
            f.file
                .read_exact_at(dst, e.offset)
                .map_err(|err| match err.kind() {
                    std::io::ErrorKind::UnexpectedEof => f.truncated(),
                    _ => CoreError::io(&f.path, err),
                })?;
        }
    }
    buf.set_len(src.len);
    Ok(())
}

/// `O_DIRECT` read of an extent: whole aligned blocks to its (aligned) region position, up to
/// the end of the extent rounded up to a block, or of the file (the buffer's capacity is a
/// multiple of the alignment).
fn read_extent_direct(f: &OpenFile, e: &SourceExtent, buf: &mut AlignedBuf) -> Result<()> {
    let spare = buf.spare_mut();
    // The next extent starts at the next aligned region position: a whole last block never
    // overwrites it.
    let want = (e.len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let want = (want as usize).min(spare.len() - e.region_offset);
    let dst = &mut spare[e.region_offset..e.region_offset + want];
    let mut got = 0usize;
    while got < e.len {
        match f.file.read_at(&mut dst[got..], e.offset + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                // An unaligned short read is the end of the file (and another read from an
                // unaligned offset would be refused).
                if !(got as u64).is_multiple_of(DIRECT_ALIGN) {
                    break;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(CoreError::io(&f.path, err)),
        }
    }
    if got < e.len {
        return Err(f.truncated());
    }
    Ok(())
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
/// `(bytes, seconds)`: the raw bandwidth of this machine's path for these files. With `cold`,
/// each file's pages are dropped from the page cache first, so the figure is the disk's.
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
            None => drop(map_source(&files, s)?),
        }
        bytes += s.bytes_read;
    }
    Ok((bytes, start.elapsed().as_secs_f64()))
}
