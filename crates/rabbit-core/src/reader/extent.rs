//! One unit's bytes: its extents (byte ranges of files) read into a buffer at their region
//! positions or mapped, each file opened once and checked (size, mtime) before every read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rabbit_split::{fsutil, FileId, FileStamp, SplitError, UnitRegion};

use super::ReadMode;
use crate::buffer::AlignedBuf;
use crate::error::{CoreError, Result};

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
    /// Mapped from the files, one mapping per extent (shared with the reader when it keeps its
    /// mappings from one sweep to the next).
    Map(Arc<Vec<MappedExtent>>),
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
pub(super) struct OpenFile {
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Opened with `O_DIRECT`: reads must be aligned.
    pub(super) direct: bool,
    pub(super) stamp: FileId,
    /// The file is an original checkpoint shard (streaming in place), not a split unit file:
    /// for messages.
    pub(super) original: bool,
}

impl OpenFile {
    /// Fails when the file is now shorter than `need` bytes, or was modified since it was
    /// opened.
    pub(super) fn check(&self, need: u64) -> Result<u64> {
        let md = self
            .file
            .metadata()
            .map_err(|e| CoreError::io(&self.path, e))?;
        if md.len() < need {
            return Err(self.truncated());
        }
        if FileStamp::id_of(&md) != self.stamp {
            return Err(CoreError::SourceChanged {
                path: self.path.clone(),
            });
        }
        Ok(md.len())
    }

    fn truncated(&self) -> CoreError {
        CoreError::truncated_file(&self.path, self.original)
    }
}

/// One extent of a unit, its file an index into the reader's files.
pub(super) struct SourceExtent {
    pub(super) file: usize,
    pub(super) offset: u64,
    pub(super) len: usize,
    pub(super) region_offset: usize,
}

pub(super) struct Source {
    pub(super) extents: Vec<SourceExtent>,
    /// Region length.
    pub(super) len: usize,
    pub(super) bytes_read: u64,
}

/// Opens every file of `regions` once (the same shard serves many units) and turns the regions
/// into sources. `O_DIRECT` is used for a file only when every extent read from it is aligned.
pub(super) fn open_sources(
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
            stamp: FileStamp::id_of(&md),
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

pub(super) fn map_source(files: &[Arc<OpenFile>], src: &Source) -> Result<Vec<MappedExtent>> {
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

/// Maps a unit and faults every page in: what bringing it to the compute threads costs through
/// mappings (for measuring; the reader itself leaves cached pages to the first access).
pub(super) fn map_populated(files: &[Arc<OpenFile>], src: &Source) -> Result<()> {
    for (e, m) in src.extents.iter().zip(map_source(files, src)?) {
        populate(&files[e.file], &m.map, e.offset + e.len as u64)?;
    }
    Ok(())
}

/// Makes a mapping kept from an earlier sweep ready again: the files are checked as for a new
/// mapping, and pages the kernel dropped from the page cache since (memory pressure) are read
/// back now, on the reader thread, ahead of compute. Pages still cached are normally still
/// mapped from the last sweep: nothing to do, no page-table work (which is what mapping every
/// sweep cost); a page whose entry the kernel dropped is a minor fault on first use.
pub(super) fn refresh_source(
    files: &[Arc<OpenFile>],
    src: &Source,
    maps: &[MappedExtent],
) -> Result<()> {
    for (e, m) in src.extents.iter().zip(maps) {
        let f = &files[e.file];
        f.check(e.offset + e.len as u64)?;
        if !all_cached(&m.map) {
            populate(f, &m.map, e.offset + e.len as u64)?;
        }
    }
    Ok(())
}

/// Faults every page of a mapping of `f` (ending at file offset `end`) in, reading what is not
/// cached: `MADV_POPULATE_READ`, or on kernels before 5.14 (EINVAL) a read of one byte per page.
/// A page past the end of the file (cut short since it was checked) is an error naming it, not
/// a SIGBUS.
fn populate(f: &OpenFile, m: &memmap2::Mmap, end: u64) -> Result<()> {
    // SAFETY: the range is the mapping's own; POPULATE_READ only faults pages in.
    let rc = unsafe {
        libc::madvise(
            m.as_ptr() as *mut libc::c_void,
            m.len(),
            libc::MADV_POPULATE_READ,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => {}
        Some(libc::EFAULT) => return Err(f.truncated()),
        _ => return Err(CoreError::io(&f.path, err)),
    }
    // Old kernels: touch each page, after checking again that the file still covers them.
    f.check(end)?;
    let page = rustix::param::page_size().max(4096);
    let mut sum = 0u8;
    for i in (0..m.len()).step_by(page) {
        // SAFETY: i < m.len(): inside the mapping, within the file as just checked.
        sum ^= unsafe { std::ptr::read_volatile(m.as_ptr().add(i)) };
    }
    std::hint::black_box(sum);
    Ok(())
}

/// Drops a mapping's pages from this process's page tables (`MADV_DONTNEED`; the file's pages
/// stay in the page cache until dropped with `posix_fadvise`, which cannot drop mapped pages).
pub(super) fn unmap_pages(maps: &[MappedExtent]) {
    for m in maps {
        // SAFETY: the range is the mapping's own; for a shared read-only file mapping DONTNEED
        // only zaps page-table entries (the next access faults the same bytes back in).
        unsafe {
            libc::madvise(
                m.map.as_ptr() as *mut libc::c_void,
                m.map.len(),
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// Bytes mapped by a unit's mappings.
pub(super) fn mapped_len(maps: &[MappedExtent]) -> u64 {
    maps.iter().map(|m| m.map.len() as u64).sum()
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
pub(super) fn read_source(
    files: &[Arc<OpenFile>],
    src: &Source,
    buf: &mut AlignedBuf,
) -> Result<()> {
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
