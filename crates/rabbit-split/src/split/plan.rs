//! Planning a split: every unit resolved against the checkpoint (which tensors, stored how, in
//! what order, with what header), and the `split.plan.json` that lets a rerun recognize unit
//! files of the same split.

use std::collections::{BTreeMap, HashSet};

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::error::{Result, SplitError};
use crate::fsutil;
use crate::layout::{Layout, RowOrder, UnitSpec};
use crate::manifest::{QuantizedEntry, SplitSettings, FORMAT_NAME, FORMAT_VERSION, PLAN_FILE};
use crate::quant::{Compression, QUANT_BLOCK};
use crate::writer::{build_header, HeaderLayout, TensorHeader};

use super::SplitOptions;

/// Contents of `split.plan.json`: identifies the split being written so a rerun knows whether
/// unit files already in the directory belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Plan {
    pub(super) format: String,
    pub(super) format_version: u32,
    pub(super) source_fingerprint: String,
    pub(super) layout_digest: String,
    pub(super) options: SplitSettings,
    pub(super) units: Vec<PlanUnit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PlanUnit {
    pub(super) name: String,
    pub(super) file: String,
    pub(super) size: u64,
    pub(super) header_digest: String,
}

/// Where the bytes of one output tensor come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    /// Copied verbatim.
    Copy,
    /// The per-block `f32` scales of the source tensor.
    Scales(Compression),
    /// The codes of the source tensor.
    Codes(Compression),
}

/// One tensor of a unit file.
pub(super) struct Piece<'a> {
    pub(super) loc: &'a TensorLoc,
    pub(super) source: Source,
    /// The split stores the rows regrouped (the checkpoint's bytes are read in this order).
    pub(super) order: Option<&'a RowOrder>,
    pub(super) out: TensorHeader,
}

/// One unit, resolved against the checkpoint.
pub(super) struct UnitPlan<'a> {
    pub(super) spec: &'a UnitSpec,
    pub(super) file: String,
    pub(super) path: PathBuf,
    /// Output tensors in file order.
    pub(super) pieces: Vec<Piece<'a>>,
    /// Source tensors stored quantized, in layout order.
    pub(super) quantized: Vec<QuantizedEntry>,
    pub(super) header: HeaderLayout,
}

/// A unit's tensors as found in the checkpoint: `(name in the layout, where it is)`, required
/// ones first, in layout order.
pub(crate) type ResolvedUnit<'a> = (&'a UnitSpec, Vec<(&'a str, &'a TensorLoc)>);

/// Finds every unit's tensors in the checkpoint (through the layout's aliases) and checks them
/// against what the layout implies: shapes, row orders that divide the rows, no tensor left
/// unclaimed. Shared by the splitter and by streaming in place (`crate::in_place`), so both
/// refuse the same checkpoints with the same errors.
pub(crate) fn resolve_units<'a>(
    ckpt: &'a Checkpoint,
    layout: &'a Layout,
) -> Result<Vec<ResolvedUnit<'a>>> {
    let mut claimed: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(layout.units.len());
    for spec in &layout.units {
        // (name in the split, where it is in the checkpoint): an aliased checkpoint name is
        // stored under the layout's name, so everything after the split sees one naming.
        let mut locs: Vec<(&str, &TensorLoc)> =
            Vec::with_capacity(spec.required.len() + spec.optional.len());
        for name in &spec.required {
            let loc =
                layout
                    .find(name, |n| ckpt.tensor(n))
                    .ok_or_else(|| SplitError::MissingTensor {
                        unit: spec.name.clone(),
                        tensor: name.clone(),
                    })?;
            locs.push((name, loc));
        }
        locs.extend(
            spec.optional
                .iter()
                .filter_map(|n| layout.find(n, |n| ckpt.tensor(n)).map(|l| (n.as_str(), l))),
        );
        claimed.extend(locs.iter().map(|(_, l)| l.name.as_str()));
        for &(name, loc) in &locs {
            if let Some(expected) = layout.shapes.get(name) {
                if *expected != loc.shape {
                    return Err(SplitError::TensorShape {
                        file: loc.file.clone(),
                        tensor: loc.name.clone(),
                        found: loc.shape.clone(),
                        expected: expected.clone(),
                    });
                }
            }
            if let Some(o) = RowOrder::of(&layout.row_orders, name) {
                let rows = loc.shape.first().copied().unwrap_or(0);
                if rows == 0 || rows % o.order.len() != 0 {
                    return Err(SplitError::InvalidLayout {
                        architecture: layout.architecture.clone(),
                        reason: format!(
                            "{name} has shape {:?}: its {rows} rows cannot be regrouped into {} blocks",
                            loc.shape,
                            o.order.len()
                        ),
                    });
                }
            }
        }
        out.push((spec, locs));
    }
    let unclaimed: Vec<String> = ckpt
        .tensors()
        .map(|l| l.name.as_str())
        .filter(|n| !claimed.contains(n) && !layout.is_ignored(n))
        .map(str::to_string)
        .collect();
    if !unclaimed.is_empty() {
        return Err(SplitError::UnclaimedTensors {
            architecture: layout.architecture.clone(),
            names: unclaimed,
        });
    }
    Ok(out)
}

pub(super) fn plan_units<'a>(
    ckpt: &'a Checkpoint,
    layout: &'a Layout,
    opts: &SplitOptions,
    fingerprint: &str,
    out: &Path,
) -> Result<Vec<UnitPlan<'a>>> {
    let resolved = resolve_units(ckpt, layout)?;
    let mut plans = Vec::with_capacity(resolved.len());
    for (spec, locs) in resolved {
        let mut pieces = Vec::with_capacity(locs.len());
        let mut quantized = Vec::new();
        // Each stored tensor's group (codes and scales in their tensor's).
        let mut groups: BTreeMap<String, u32> = BTreeMap::new();
        for (name, loc) in locs {
            let order = RowOrder::of(&layout.row_orders, name);
            let g = layout.groups.get(name).copied().unwrap_or(0);
            groups.insert(name.to_string(), g);
            groups.insert(format!("{name}.q"), g);
            groups.insert(format!("{name}.scale"), g);
            let scheme = opts
                .compression_for(spec.kind, loc)
                .filter(|_| !layout.uncompressed.iter().any(|u| u == name));
            let Some(scheme) = scheme else {
                pieces.push(Piece {
                    loc,
                    source: Source::Copy,
                    order,
                    out: TensorHeader {
                        name: name.to_string(),
                        dtype: loc.dtype,
                        shape: loc.shape.clone(),
                    },
                });
                continue;
            };
            let numel = loc.shape.iter().product::<usize>();
            let q = QuantizedEntry {
                name: name.to_string(),
                scheme,
                block_size: QUANT_BLOCK,
                shape: loc.shape.clone(),
                dtype: loc.dtype,
                codes: format!("{name}.q"),
                scales: format!("{name}.scale"),
            };
            pieces.push(Piece {
                loc,
                source: Source::Scales(scheme),
                order,
                out: TensorHeader {
                    name: q.scales.clone(),
                    dtype: crate::dtype::Dtype::F32,
                    shape: vec![Compression::num_blocks(numel)],
                },
            });
            pieces.push(Piece {
                loc,
                source: Source::Codes(scheme),
                order,
                out: TensorHeader {
                    name: q.codes.clone(),
                    dtype: scheme.codes_dtype(),
                    shape: vec![scheme.codes_len(numel)],
                },
            });
            quantized.push(q);
        }
        // Group by group (an expert's tensors together), widest elements first within one:
        // every size is a multiple of the element size, so each tensor starts naturally aligned
        // (a group ending off alignment only makes the next group's tensors copied, not viewed,
        // when read). Stable sort keeps the layout's order among equals.
        pieces.sort_by_key(|p| {
            (
                groups[&p.out.name],
                std::cmp::Reverse(p.out.dtype.size_bytes()),
            )
        });
        let file = format!("{}.safetensors", spec.name);
        let path = out.join(&file);
        let tensors: Vec<TensorHeader> = pieces.iter().map(|p| p.out.clone()).collect();
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), FORMAT_NAME.to_string());
        md.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        md.insert("source_fingerprint".to_string(), fingerprint.to_string());
        md.insert("unit".to_string(), spec.name.clone());
        let header = build_header(&path, &tensors, &md, opts.alignment)?;
        plans.push(UnitPlan {
            spec,
            file,
            path,
            pieces,
            quantized,
            header,
        });
    }
    Ok(plans)
}

/// True when `path` is a complete unit file of this plan: right size and byte-identical header
/// (which carries the source fingerprint). Complete because files only get their final name
/// after being fsynced.
pub(super) fn unit_file_matches(path: &Path, header: &HeaderLayout) -> Result<bool> {
    let f = match fsutil::open_regular(path) {
        Ok(f) => f,
        Err(SplitError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(false)
        }
        // A FIFO, directory, ... in its place: not a unit file; writing the unit replaces it.
        Err(SplitError::NotAFile { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata().map_err(|e| SplitError::io(path, e))?.len();
    if len != header.file_size() {
        return Ok(false);
    }
    let mut got = vec![0u8; header.bytes.len()];
    match f.read_exact_at(&mut got, 0) {
        Ok(()) => Ok(got == header.bytes),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(SplitError::io(path, e)),
    }
}

pub(super) fn read_plan(out: &Path) -> Option<Plan> {
    let bytes = fsutil::read_regular(&out.join(PLAN_FILE)).ok()??;
    serde_json::from_slice(&bytes).ok()
}
