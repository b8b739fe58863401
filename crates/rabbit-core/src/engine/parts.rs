//! A streamed sparse layer is read in parts: its dense part (norms, attention, router, shared
//! expert), read ahead by the layer reader like any layer, and each routed expert, read after
//! routing. A part is a unit entry of just its tensors, their offsets rewritten to positions in
//! the part's own region, and that region: the byte ranges of the unit's files holding them,
//! packed one after the other (a buffer or a mapping per part, never one the size of the
//! layer).

use rabbit_split::in_place::Extent;
use rabbit_split::manifest::UnitEntry;
use rabbit_split::UnitRegion;

use crate::error::{CoreError, Result};

/// Alignment of a range's start in its file and in the part's region: `O_DIRECT` reads stay
/// aligned, and each range's last block never overwrites the next range (the alignment of
/// in-place regions, which the reader's direct reads rely on).
const ALIGN: u64 = rabbit_split::in_place::REGION_ALIGN;

/// Tensors at most this far apart in a file are read as one range.
const MERGE_GAP: u64 = 4096;

/// One part of a unit.
#[derive(Debug, Clone)]
pub struct Part {
    /// The part's tensors (and compressed entries), offsets in `region`.
    pub entry: UnitEntry,
    /// Where its bytes come from.
    pub region: UnitRegion,
}

/// The part of `entry` (its region `region`) holding the tensors `keep` accepts: a compressed
/// tensor is kept when its original name is, with its codes and scales.
pub fn part_of(
    entry: &UnitEntry,
    region: &UnitRegion,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Part> {
    let quantized: Vec<_> = entry
        .quantized
        .iter()
        .filter(|q| keep(&q.name))
        .cloned()
        .collect();
    // A compressed tensor's codes and scales go with its original name.
    let original: std::collections::HashMap<&str, &str> = entry
        .quantized
        .iter()
        .flat_map(|q| {
            [
                (q.codes.as_str(), q.name.as_str()),
                (q.scales.as_str(), q.name.as_str()),
            ]
        })
        .collect();
    let stored = |name: &str| keep(original.get(name).copied().unwrap_or(name));
    let mut tensors: Vec<_> = entry
        .tensors
        .iter()
        .filter(|t| stored(&t.name))
        .cloned()
        .collect();
    tensors.sort_by_key(|t| t.offset);
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = 0u64;
    // The range being built: (region start, region end, first tensor index).
    let mut current: Option<(u64, u64, usize)> = None;
    let mut flush = |range: (u64, u64, usize),
                     upto: usize,
                     tensors: &mut [rabbit_split::manifest::TensorEntry]|
     -> Result<()> {
        let (a, b, first) = range;
        let (extent, file_at) = region
            .locate(a, b - a)
            .ok_or_else(|| CoreError::BadTensor {
                file: entry.file.clone().into(),
                tensor: tensors[first].name.clone(),
                reason: "its bytes lie outside the unit's data".into(),
            })?;
        // Start on an aligned file offset, without reaching before the extent.
        let lead = (file_at % ALIGN).min(a - extent.region_offset);
        extents.push(Extent {
            file: extent.file.clone(),
            file_offset: file_at - lead,
            len: b - a + lead,
            region_offset: pos,
        });
        for t in &mut tensors[first..upto] {
            t.offset = pos + lead + (t.offset - a);
        }
        pos += (b - a + lead).div_ceil(ALIGN) * ALIGN;
        Ok(())
    };
    for i in 0..tensors.len() {
        let a = tensors[i].offset;
        let b = a
            .checked_add(tensors[i].len)
            .ok_or_else(|| CoreError::BadTensor {
                file: entry.file.clone().into(),
                tensor: tensors[i].name.clone(),
                reason: "its offset and length overflow".into(),
            })?;
        current = match current {
            // Adjacent in the region and in one extent of it: one read.
            Some((s, e, first))
                if a >= e && a - e <= MERGE_GAP && region.locate(s, b - s).is_some() =>
            {
                Some((s, b.max(e), first))
            }
            Some(range) => {
                flush(range, i, &mut tensors)?;
                Some((a, b, i))
            }
            None => Some((a, b, i)),
        };
    }
    if let Some(range) = current {
        let n = tensors.len();
        flush(range, n, &mut tensors)?;
    }
    Ok(Part {
        entry: UnitEntry {
            tensors,
            quantized,
            ..entry.clone()
        },
        region: UnitRegion { extents, len: pos },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rabbit_split::dtype::Dtype;
    use rabbit_split::layout::UnitKind;
    use rabbit_split::manifest::TensorEntry;
    use std::path::PathBuf;

    fn t(name: &str, offset: u64, len: u64) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![len as usize],
            offset,
            len,
        }
    }

    #[test]
    fn parts_pack_their_ranges_and_keep_file_positions() {
        let entry = UnitEntry {
            name: "layer.000".into(),
            kind: UnitKind::Layer(0),
            file: "x".into(),
            size: 0,
            checksum: String::new(),
            data_offset: 0,
            data_len: 100_000,
            tensors: vec![
                t("a", 0, 100),
                t("e0.w", 5000, 3000),
                t("e0.v", 8000, 1000),
                t("e1.w", 20_000, 4000),
                t("b", 50_000, 10),
            ],
            quantized: vec![],
        };
        let region = UnitRegion {
            extents: vec![Extent {
                file: PathBuf::from("f"),
                file_offset: 8192,
                len: 100_000,
                region_offset: 0,
            }],
            len: 100_000,
        };
        let dense = part_of(&entry, &region, &|n| n == "a" || n == "b").unwrap();
        assert_eq!(dense.entry.tensors.len(), 2);
        assert_eq!(
            dense.region.extents.len(),
            2,
            "a and b are far apart: two ranges"
        );
        for (te, orig) in dense.entry.tensors.iter().zip([0u64, 50_000]) {
            // The part's byte at the tensor's new offset is the file byte it was at.
            let (e, at) = dense.region.locate(te.offset, te.len).unwrap();
            assert_eq!(at, 8192 + orig);
            assert_eq!(e.file_offset % ALIGN, 0);
            assert_eq!(e.region_offset % ALIGN, 0);
        }
        let e0 = part_of(&entry, &region, &|n| n.starts_with("e0.")).unwrap();
        assert_eq!(e0.region.extents.len(), 1, "adjacent tensors: one read");
        assert!(
            e0.region.len <= 8192,
            "the part is its tensors, not the layer"
        );
        let (_, at) = e0.region.locate(e0.entry.tensors[1].offset, 1000).unwrap();
        assert_eq!(at, 8192 + 8000);
    }
}
