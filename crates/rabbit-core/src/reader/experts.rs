//! Reads asked for after routing: each routed expert of a streamed sparse layer is a part of its
//! unit with a region of its own ([`crate::engine::parts`]), read when the router has picked it,
//! on the thread asking (the compute thread, which has nothing else to do until the experts
//! arrive). All the experts of one layer are announced to the kernel first
//! (`POSIX_FADV_WILLNEED`), so their reads from disk are in flight together, then each is mapped
//! (CPU) or read into a buffer of its own (device, `O_DIRECT`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rabbit_split::UnitRegion;

use super::extent::{map_source, open_sources, read_source, refresh_source, OpenFile, Source};
use super::{ReadMode, UnitBytes};
use crate::buffer::AlignedBuf;
use crate::error::Result;

/// Parts of units read on request, by index.
pub struct PartReader {
    files: Vec<Arc<OpenFile>>,
    sources: Vec<Source>,
    mode: ReadMode,
}

/// One part, read.
pub struct ReadPart {
    /// Its bytes (tensor offsets of the part's entry are positions in them).
    pub bytes: UnitBytes,
    /// Bytes read from the files.
    pub bytes_read: u64,
    /// Time reading (or mapping and faulting in).
    pub read_time: Duration,
}

impl PartReader {
    /// Opens the files of `regions` (one per part) for `mode`; `original` changes only the
    /// messages (shards streamed in place).
    pub fn open(regions: &[&UnitRegion], mode: ReadMode, original: bool) -> Result<PartReader> {
        let (files, sources) = open_sources(regions, mode, original)?;
        Ok(PartReader {
            files,
            sources,
            mode,
        })
    }

    /// Number of parts.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Bytes part `i` reads.
    pub fn part_bytes(&self, i: usize) -> u64 {
        self.sources[i].bytes_read
    }

    /// Tells the kernel these parts will be read now: their disk reads start together, each
    /// [`PartReader::read`] then waits only for its own (advisory; page-cache reads only).
    pub fn advise(&self, parts: &[usize]) {
        if self.mode == ReadMode::Direct {
            return;
        }
        for &i in parts {
            for e in &self.sources[i].extents {
                // Advisory: failure only means the reads are not started early.
                let _ = rustix::fs::fadvise(
                    &self.files[e.file].file,
                    e.offset,
                    std::num::NonZeroU64::new(e.len as u64),
                    rustix::fs::Advice::WillNeed,
                );
            }
        }
    }

    /// Reads part `i`: mapped and faulted in (CPU), or read into a buffer of its own.
    pub fn read(&self, i: usize) -> Result<ReadPart> {
        let src = &self.sources[i];
        let start = Instant::now();
        let bytes = match self.mode {
            ReadMode::Map => UnitBytes::Map(Arc::new(map_source(&self.files, src)?)),
            ReadMode::Copy | ReadMode::Direct => {
                let mut buf = AlignedBuf::new(src.len.max(1));
                read_source(&self.files, src, &mut buf)?;
                UnitBytes::Buf(buf)
            }
        };
        Ok(ReadPart {
            bytes,
            bytes_read: src.bytes_read,
            read_time: start.elapsed(),
        })
    }

    /// Makes part `i`'s bytes, kept from an earlier read, ready again: the files are checked
    /// (size, modification time) and mapped pages the kernel dropped are read back.
    pub fn refresh(&self, i: usize, bytes: &UnitBytes) -> Result<()> {
        let src = &self.sources[i];
        match bytes {
            UnitBytes::Map(maps) => refresh_source(&self.files, src, maps),
            // A buffer holds its bytes; the files must still be the ones they came from.
            UnitBytes::Buf(_) => {
                for e in &src.extents {
                    self.files[e.file].check(e.offset + e.len as u64)?;
                }
                Ok(())
            }
        }
    }

    /// Drops part `i`'s pages from the page cache (benchmarks of models larger than RAM: every
    /// read that is not a cache hit then comes from the disk). Its mapping must be gone.
    pub fn evict(&self, i: usize) {
        for e in &self.sources[i].extents {
            // Advisory: failure only means the pages stay cached.
            let _ = rustix::fs::fadvise(
                &self.files[e.file].file,
                e.offset,
                std::num::NonZeroU64::new(e.len as u64),
                rustix::fs::Advice::DontNeed,
            );
        }
    }
}
