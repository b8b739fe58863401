//! Streaming straight from a checkpoint's own weight files, no split written: every unit is
//! described as byte ranges of the original shards ([`UnitRegion`]), which the executor reads
//! (or maps) into one region per unit, exactly as it reads a split unit's data region.
//!
//! A split unit is the special case of one extent. Each tensor of a safetensors shard (and of an
//! uncompressed `torch.save` archive) is one contiguous byte range, and `save_pretrained` writes
//! a layer's tensors next to each other, so a layer is usually one or two ranges (two when its
//! norms are stored in another dtype, which safetensors groups separately).
//!
//! Extents start at [`REGION_ALIGN`]-aligned file offsets and sit at aligned positions of the
//! region, so `O_DIRECT` reads need no bounce buffer and every tensor keeps, in the region, the
//! alignment it has in its file.

use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::error::{Result, SplitError};
use crate::layout::{Layout, RowOrder, UnitKind};
use crate::manifest::{Manifest, SplitSettings, TensorEntry, UnitEntry, FORMAT_NAME};

/// Alignment of extents (file offsets and region positions): a page, and a multiple of every
/// `O_DIRECT` block size in use.
pub const REGION_ALIGN: u64 = 4096;

/// Tensors of one unit at most this far apart in the same file are read as one range: the next
/// range would start this much early anyway (its start is aligned down), so reading the gap
/// costs nothing extra and saves a read.
pub const COALESCE_GAP: u64 = REGION_ALIGN;

/// One contiguous byte range of a file, placed in a unit's region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// The file.
    pub file: PathBuf,
    /// First byte read from the file.
    pub file_offset: u64,
    /// Bytes read.
    pub len: u64,
    /// Where the first byte goes in the region.
    pub region_offset: u64,
}

/// Where one unit's region comes from: its extents in region order (non-overlapping, ascending
/// `region_offset`). Tensor offsets of the unit's [`UnitEntry`] are positions in the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitRegion {
    /// The ranges read.
    pub extents: Vec<Extent>,
    /// Length of the region (the buffer a copy needs): the end of the last extent.
    pub len: u64,
}

impl UnitRegion {
    /// The region of a split unit: its data region, one extent.
    pub fn of_split_unit(split_dir: &Path, u: &UnitEntry) -> UnitRegion {
        UnitRegion {
            extents: vec![Extent {
                file: split_dir.join(&u.file),
                file_offset: u.data_offset,
                len: u.data_len,
                region_offset: 0,
            }],
            len: u.data_len,
        }
    }

    /// The extent holding region bytes `offset..offset + len`, and the file offset of the first.
    pub fn locate(&self, offset: u64, len: u64) -> Option<(&Extent, u64)> {
        let end = offset.checked_add(len)?;
        // Extents ascend: the candidate is the last one starting at or before `offset`.
        let i = self
            .extents
            .partition_point(|e| e.region_offset <= offset)
            .checked_sub(1)?;
        let e = &self.extents[i];
        (end <= e.region_offset + e.len).then(|| (e, e.file_offset + (offset - e.region_offset)))
    }

    /// Bytes actually read for the unit (the region minus its alignment gaps).
    pub fn bytes_read(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }
}

/// A checkpoint opened for streaming in place: an in-memory manifest (never written; its units'
/// tensor offsets are region positions, `file` is the path of the unit's first shard,
/// `size`/`checksum` are empty) with each unit's region, and the row orders the executor applies after reading.
#[derive(Debug, Clone)]
pub struct InPlace {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Units as a split's manifest would list them.
    pub manifest: Manifest,
    /// `regions[i]` is where `manifest.units[i]` comes from.
    pub regions: Vec<UnitRegion>,
    /// Tensors whose rows the executor must regroup (a split does it once on disk).
    pub row_orders: Vec<RowOrder>,
    /// Total bytes of the weight files a split would have copied.
    pub weight_bytes: u64,
    /// Each weight file's identity when its header was read: the offsets above hold for these
    /// bytes only, so a file replaced or modified before the model opens is refused.
    pub stamps: Vec<FileStamp>,
}

/// A file's identity: `(dev, ino, size, mtime s, mtime ns)`.
pub type FileId = (u64, u64, u64, i64, i64);

/// A file and its identity at some moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    /// The file.
    pub path: PathBuf,
    /// Its identity then.
    pub id: FileId,
}

impl FileStamp {
    /// The identity of `path` now (following symlinks, as opening it does).
    pub fn of(path: &Path) -> Result<FileStamp> {
        let md = std::fs::metadata(path).map_err(|e| SplitError::io(path, e))?;
        Ok(FileStamp {
            path: path.to_path_buf(),
            id: Self::id_of(&md),
        })
    }

    /// The identity fields of a file's metadata.
    pub fn id_of(md: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        (md.dev(), md.ino(), md.len(), md.mtime(), md.mtime_nsec())
    }

    /// Whether the file is still the one stamped.
    pub fn unchanged(&self) -> Result<bool> {
        Ok(Self::of(&self.path)?.id == self.id)
    }
}

/// Plans streaming `checkpoint_dir` in place with `layout`: the same checks as a split (missing,
/// misshapen or unclaimed tensors are refused by name), nothing written anywhere.
pub fn plan_in_place(checkpoint_dir: &Path, layout: &Layout) -> Result<InPlace> {
    layout.validate()?;
    crate::checkpoint::read_config_json(checkpoint_dir)?;
    let ckpt = Checkpoint::open_for(checkpoint_dir, layout)?;
    plan_opened(&ckpt, layout)
}

/// [`plan_in_place`] of an opened checkpoint.
pub fn plan_opened(ckpt: &Checkpoint, layout: &Layout) -> Result<InPlace> {
    let stamps = ckpt
        .files
        .iter()
        .map(|f| FileStamp::of(f))
        .collect::<Result<Vec<_>>>()?;
    let resolved = crate::split::resolve_units(ckpt, layout)?;
    let mut units = Vec::with_capacity(resolved.len());
    let mut regions = Vec::with_capacity(resolved.len());
    let mut weight_bytes = 0u64;
    for (spec, locs) in resolved {
        let (entry, region) = unit_of(&spec.name, spec.kind, &locs)?;
        weight_bytes += region.bytes_read();
        units.push(entry);
        regions.push(region);
    }
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: crate::manifest::FORMAT_VERSION,
        architecture: layout.architecture.clone(),
        source_fingerprint: ckpt.fingerprint()?,
        layout_digest: layout.digest(),
        options: SplitSettings::uncompressed(REGION_ALIGN),
        tied_lm_head: layout.tied_lm_head,
        original_deleted: false,
        units,
    };
    Ok(InPlace {
        dir: ckpt.dir.clone(),
        manifest,
        regions,
        row_orders: layout.row_orders.clone(),
        weight_bytes,
        stamps,
    })
}

/// Tensors of one file read as one range: `(file index, start, end, the tensors)`.
type Range<'a> = (usize, u64, u64, Vec<&'a (&'a str, &'a TensorLoc)>);

/// One unit: its tensors grouped by file, sorted by offset, ranges closer than
/// [`COALESCE_GAP`] merged, each range placed at the next aligned region position.
fn unit_of(
    name: &str,
    kind: UnitKind,
    locs: &[(&str, &TensorLoc)],
) -> Result<(UnitEntry, UnitRegion)> {
    let mut sorted: Vec<&(&str, &TensorLoc)> = locs.iter().collect();
    sorted.sort_by_key(|(_, l)| (l.file_index, l.offset));
    // Ranges per file, in file order: [start, end) plus the tensors inside.
    let mut ranges: Vec<Range<'_>> = Vec::new();
    for item in sorted {
        let l = item.1;
        let end = l
            .offset
            .checked_add(l.len)
            .ok_or_else(|| SplitError::BadTensor {
                file: l.file.clone(),
                tensor: l.name.clone(),
                reason: "its byte range overflows".into(),
            })?;
        match ranges.last_mut() {
            Some((f, _, e, members)) if *f == l.file_index && l.offset <= *e + COALESCE_GAP => {
                *e = (*e).max(end);
                members.push(item);
            }
            _ => ranges.push((l.file_index, l.offset, end, vec![item])),
        }
    }
    let mut extents = Vec::with_capacity(ranges.len());
    let mut tensors = Vec::with_capacity(locs.len());
    let mut cursor = 0u64;
    for (_, start, end, members) in ranges {
        let file = &members[0].1.file;
        let file_offset = start / REGION_ALIGN * REGION_ALIGN;
        let region_offset = cursor;
        for (tname, l) in members {
            tensors.push(TensorEntry {
                name: tname.to_string(),
                dtype: l.dtype,
                shape: l.shape.clone(),
                offset: region_offset + (l.offset - file_offset),
                len: l.len,
            });
        }
        let len = end - file_offset;
        extents.push(Extent {
            file: file.clone(),
            file_offset,
            len,
            region_offset,
        });
        cursor = (region_offset + len).div_ceil(REGION_ALIGN) * REGION_ALIGN;
    }
    let region_len = extents.last().map_or(0, |e| e.region_offset + e.len);
    // The full path: messages name it, and joining it to any directory leaves it as it is.
    let file = extents
        .first()
        .map(|e| e.file.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entry = UnitEntry {
        name: name.to_string(),
        kind,
        file,
        size: 0,
        checksum: String::new(),
        data_offset: 0,
        data_len: region_len,
        tensors,
        quantized: Vec::new(),
    };
    Ok((
        entry,
        UnitRegion {
            extents,
            len: region_len,
        },
    ))
}
