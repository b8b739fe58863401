//! The splitter: checkpoint + layout -> one aligned safetensors file per unit + manifest.
//!
//! Crash-safety protocol (details in docs/FORMAT.md): remove any old manifest, clean stray
//! `.tmp` files, write `split.plan.json`, write each missing unit to `<unit>.safetensors.tmp`,
//! fsync, rename, and write `manifest.json` last (tmp + fsync + rename). A rerun after a crash
//! reuses every unit file whose header and size match the plan and writes the rest, producing
//! the same bytes as an uninterrupted run.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    read_config_json, source_fingerprint, Checkpoint, TensorLoc, INDEX_FILE, SINGLE_FILE,
};
use crate::error::{Result, SplitError};
use crate::fsutil::{self, remove_if_exists, write_atomic, DirLock};
use crate::layout::{Layout, UnitKind, UnitSpec};
use crate::manifest::{
    Manifest, QuantizedEntry, SplitSettings, TensorEntry, UnitEntry, FORMAT_NAME, FORMAT_VERSION,
    MANIFEST_FILE, PLAN_FILE,
};
use crate::quant::{self, Compression, QUANT_BLOCK};
use crate::verify::verify_against;
use crate::writer::{
    build_header, check_alignment, file_checksum, AlignedWriter, HeaderLayout, TensorHeader,
};

/// Largest chunk of tensor data held in memory while copying (the buffer is reused).
pub const COPY_CHUNK: usize = 16 << 20;

/// Default data-region alignment: a page, and a multiple of every O_DIRECT block size in use.
pub const DEFAULT_ALIGNMENT: u64 = 4096;

/// Name of the split directory created inside the checkpoint directory by default.
pub const DEFAULT_SPLIT_DIR_NAME: &str = "rabbit-split";

/// How to split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitOptions {
    /// Where to write the split; default [`default_split_dir`] of the checkpoint.
    pub out_dir: Option<PathBuf>,
    /// Delete the source weight files (shards and index; config and tokenizer files are kept)
    /// once the split is verified complete. Saves disk space; the split becomes the only copy.
    pub delete_original: bool,
    /// Data-region alignment of every unit file (power of two, >= 8). Default 4096.
    pub alignment: u64,
    /// Block-wise compression of the 2-D `.weight` matrices of layer units (see
    /// docs/FORMAT.md). Default `None`: tensors are copied verbatim.
    pub compression: Option<Compression>,
    /// With `compression`, also compress the embedding and LM head matrices.
    pub compress_embeddings: bool,
}

impl Default for SplitOptions {
    fn default() -> Self {
        SplitOptions {
            out_dir: None,
            delete_original: false,
            alignment: DEFAULT_ALIGNMENT,
            compression: None,
            compress_embeddings: false,
        }
    }
}

impl SplitOptions {
    /// The options that determine the bytes of the split (recorded in plan and manifest).
    pub fn settings(&self) -> SplitSettings {
        SplitSettings {
            alignment: self.alignment,
            compression: self.compression,
            block_size: self.compression.map(|_| QUANT_BLOCK),
            compress_embeddings: self.compression.is_some() && self.compress_embeddings,
        }
    }

    /// The split directory these options select for a checkpoint: `out_dir`, else
    /// [`default_split_dir_for`] the checkpoint and compression.
    pub fn split_dir(&self, checkpoint_dir: &Path) -> PathBuf {
        self.out_dir
            .clone()
            .unwrap_or_else(|| default_split_dir_for(checkpoint_dir, self.compression))
    }

    /// The scheme a tensor of a unit of `kind` is stored with (`None`: copied verbatim): 2-D
    /// float `.weight` tensors of layer units, and of the embedding / LM head units with
    /// `compress_embeddings`.
    pub fn compression_for(&self, kind: UnitKind, loc: &TensorLoc) -> Option<Compression> {
        let scheme = self.compression?;
        let unit_ok = match kind {
            UnitKind::Layer(_) => true,
            UnitKind::Embedding | UnitKind::LmHead => self.compress_embeddings,
            UnitKind::FinalNorm => false,
        };
        (unit_ok
            && loc.name.ends_with(".weight")
            && loc.shape.len() == 2
            && quant::is_quantizable_dtype(loc.dtype))
        .then_some(scheme)
    }
}

/// Progress reported to [`split`]'s callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitEvent {
    /// A complete, current split already exists and is used as is.
    Reused,
    /// The split is about to be written: `units` in total, of which `already_done` survive from
    /// an interrupted run; `bytes` is what remains to be written.
    Planned {
        /// Total number of units.
        units: usize,
        /// Bytes still to write.
        bytes: u64,
        /// Units reused from an interrupted run.
        already_done: usize,
    },
    /// A unit file was written (only units written by this run are reported).
    UnitDone {
        /// Position of the unit in execution order (0-based).
        index: usize,
        /// Total number of units.
        total: usize,
        /// Unit name.
        name: String,
        /// File size.
        bytes: u64,
    },
    /// The whole split was re-read and matches its checksums (before deleting originals).
    Verified,
    /// The source weight files were deleted.
    OriginalDeleted {
        /// Number of files deleted.
        files: usize,
    },
}

/// What [`split`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitOutcome {
    /// An existing current split was reused; nothing was written.
    Reused,
    /// The split was (completely or partly) written.
    Written {
        /// Bytes of unit files written by this run.
        bytes_written: u64,
        /// Unit files written by this run.
        units_written: usize,
        /// Unit files kept from an interrupted run.
        units_resumed: usize,
    },
}

/// Where the uncompressed split of a checkpoint goes by default: `<checkpoint>/rabbit-split`.
pub fn default_split_dir(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir.join(DEFAULT_SPLIT_DIR_NAME)
}

/// Where the split of a checkpoint with a given compression goes by default:
/// `<checkpoint>/rabbit-split` (none), `rabbit-split-4bit` or `rabbit-split-8bit`.
pub fn default_split_dir_for(checkpoint_dir: &Path, compression: Option<Compression>) -> PathBuf {
    match compression {
        None => default_split_dir(checkpoint_dir),
        Some(c) => checkpoint_dir.join(format!("{DEFAULT_SPLIT_DIR_NAME}-{}", c.label())),
    }
}

/// Contents of `split.plan.json`: identifies the split being written so a rerun knows whether
/// unit files already in the directory belong to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Plan {
    format: String,
    format_version: u32,
    source_fingerprint: String,
    layout_digest: String,
    options: SplitSettings,
    units: Vec<PlanUnit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PlanUnit {
    name: String,
    file: String,
    size: u64,
    header_digest: String,
}

/// Where the bytes of one output tensor come from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// Copied verbatim.
    Copy,
    /// The per-block `f32` scales of the source tensor.
    Scales(Compression),
    /// The codes of the source tensor.
    Codes(Compression),
}

/// One tensor of a unit file.
struct Piece<'a> {
    loc: &'a TensorLoc,
    source: Source,
    out: TensorHeader,
}

/// One unit, resolved against the checkpoint.
struct UnitPlan<'a> {
    spec: &'a UnitSpec,
    file: String,
    path: PathBuf,
    /// Output tensors in file order.
    pieces: Vec<Piece<'a>>,
    /// Source tensors stored quantized, in layout order.
    quantized: Vec<QuantizedEntry>,
    header: HeaderLayout,
}

fn plan_units<'a>(
    ckpt: &'a Checkpoint,
    layout: &'a Layout,
    opts: &SplitOptions,
    fingerprint: &str,
    out: &Path,
) -> Result<Vec<UnitPlan<'a>>> {
    let mut claimed: HashSet<&str> = HashSet::new();
    let mut plans = Vec::with_capacity(layout.units.len());
    for spec in &layout.units {
        let mut locs: Vec<&TensorLoc> =
            Vec::with_capacity(spec.required.len() + spec.optional.len());
        for name in &spec.required {
            let loc = ckpt.tensor(name).ok_or_else(|| SplitError::MissingTensor {
                unit: spec.name.clone(),
                tensor: name.clone(),
            })?;
            locs.push(loc);
        }
        locs.extend(spec.optional.iter().filter_map(|n| ckpt.tensor(n)));
        claimed.extend(locs.iter().map(|l| l.name.as_str()));
        let mut pieces = Vec::with_capacity(locs.len());
        let mut quantized = Vec::new();
        for loc in locs {
            let Some(scheme) = opts.compression_for(spec.kind, loc) else {
                pieces.push(Piece {
                    loc,
                    source: Source::Copy,
                    out: TensorHeader {
                        name: loc.name.clone(),
                        dtype: loc.dtype,
                        shape: loc.shape.clone(),
                    },
                });
                continue;
            };
            let numel = loc.shape.iter().product::<usize>();
            let q = QuantizedEntry {
                name: loc.name.clone(),
                scheme,
                block_size: QUANT_BLOCK,
                shape: loc.shape.clone(),
                dtype: loc.dtype,
                codes: format!("{}.q", loc.name),
                scales: format!("{}.scale", loc.name),
            };
            pieces.push(Piece {
                loc,
                source: Source::Scales(scheme),
                out: TensorHeader {
                    name: q.scales.clone(),
                    dtype: crate::dtype::Dtype::F32,
                    shape: vec![Compression::num_blocks(numel)],
                },
            });
            pieces.push(Piece {
                loc,
                source: Source::Codes(scheme),
                out: TensorHeader {
                    name: q.codes.clone(),
                    dtype: scheme.codes_dtype(),
                    shape: vec![scheme.codes_len(numel)],
                },
            });
            quantized.push(q);
        }
        // Widest elements first: every size is a multiple of the element size, so each tensor
        // starts naturally aligned. Stable sort keeps the layout's order among equals.
        pieces.sort_by_key(|p| std::cmp::Reverse(p.out.dtype.size_bytes()));
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
    Ok(plans)
}

/// True when `path` is a complete unit file of this plan: right size and byte-identical header
/// (which carries the source fingerprint). Complete because files only get their final name
/// after being fsynced.
fn unit_file_matches(path: &Path, header: &HeaderLayout) -> Result<bool> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(SplitError::io(path, e)),
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

fn write_unit(
    ckpt: &Checkpoint,
    up: &UnitPlan<'_>,
    buf: &mut Vec<u8>,
) -> Result<crate::writer::WrittenFile> {
    let mut w = AlignedWriter::with_layout(&up.path, up.header.clone())?;
    let mut qbuf = QuantBuffers::default();
    for p in &up.pieces {
        let loc = p.loc;
        match p.source {
            Source::Copy => {
                let mut done = 0u64;
                while done < loc.len {
                    let n = (loc.len - done).min(COPY_CHUNK as u64) as usize;
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    ckpt.read_range(loc, done, &mut buf[..n])?;
                    w.write_data(&buf[..n])?;
                    done += n as u64;
                }
            }
            Source::Scales(scheme) => write_quantized(ckpt, loc, scheme, false, &mut w, &mut qbuf)?,
            Source::Codes(scheme) => write_quantized(ckpt, loc, scheme, true, &mut w, &mut qbuf)?,
        }
    }
    w.finish()
}

/// Elements of a source tensor quantized per step (a multiple of [`QUANT_BLOCK`]).
const QUANT_CHUNK_ELEMS: usize = 1 << 20;

/// Buffers reused across the quantized tensors of a unit.
#[derive(Default)]
struct QuantBuffers {
    raw: Vec<u8>,
    values: Vec<f32>,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// Streams one quantized tensor's scales (`codes == false`) or codes into `w`, reading and
/// converting the source in block-aligned chunks of [`QUANT_CHUNK_ELEMS`] elements. Scales and
/// codes are computed by the same function on the same chunks, so the two passes agree.
fn write_quantized(
    ckpt: &Checkpoint,
    loc: &TensorLoc,
    scheme: Compression,
    codes: bool,
    w: &mut AlignedWriter,
    b: &mut QuantBuffers,
) -> Result<()> {
    let elem = loc.dtype.size_bytes() as u64;
    let numel = loc.len / elem;
    let mut done = 0u64;
    while done < numel {
        let n = (numel - done).min(QUANT_CHUNK_ELEMS as u64) as usize;
        let bytes = n * elem as usize;
        if b.raw.len() < bytes {
            b.raw.resize(bytes, 0);
        }
        ckpt.read_range(loc, done * elem, &mut b.raw[..bytes])?;
        b.values.clear();
        let ok = quant::to_f32(loc.dtype, &b.raw[..bytes], &mut b.values);
        debug_assert!(ok, "only float dtypes are planned for quantization");
        b.codes.clear();
        b.scales.clear();
        if codes {
            quant::quantize_append_parallel(scheme, &b.values, &mut b.codes, &mut b.scales);
            w.write_data(&b.codes)?;
        } else {
            quant::block_scales(scheme, &b.values, &mut b.scales);
            b.codes
                .extend(b.scales.iter().flat_map(|s| s.to_le_bytes()));
            w.write_data(&b.codes)?;
        }
        done += n as u64;
    }
    Ok(())
}

/// When the split goes into the checkpoint directory itself, no file of the split may have the
/// name of a source file.
fn refuse_to_overwrite_source(ckpt: &Checkpoint, out: &Path, units: &[UnitPlan<'_>]) -> Result<()> {
    let canon = |p: &Path| fs::canonicalize(p).map_err(|e| SplitError::io(p, e));
    if canon(out)? != canon(&ckpt.dir)? {
        return Ok(());
    }
    let ours: Vec<&str> = units
        .iter()
        .map(|u| u.file.as_str())
        .chain([MANIFEST_FILE, PLAN_FILE])
        .collect();
    let source = ckpt.files.iter().chain(&ckpt.index);
    for p in source {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if ours.contains(&name) || name == crate::checkpoint::CONFIG_FILE {
            return Err(SplitError::InvalidOptions {
                reason: format!(
                    "splitting into the checkpoint directory would overwrite {}",
                    p.display()
                ),
            });
        }
    }
    Ok(())
}

fn read_plan(out: &Path) -> Option<Plan> {
    let bytes = fs::read(out.join(PLAN_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
}

/// Removes leftovers of interrupted writes: `<unit>.safetensors.tmp`, `manifest.json.tmp`,
/// `split.plan.json.tmp`. Other files in the directory are never touched.
fn remove_stray_tmp(out: &Path) -> Result<()> {
    let rd = fs::read_dir(out).map_err(|e| SplitError::io(out, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| SplitError::io(out, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.ends_with(".safetensors.tmp")
            || name == format!("{MANIFEST_FILE}.tmp")
            || name == format!("{PLAN_FILE}.tmp");
        if ours && entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// The source weight files that exist now, in deletion order (shards first, index last). Works
/// on a partially deleted checkpoint.
fn existing_source_weights(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        out.push(single);
        return out;
    }
    let index = dir.join(INDEX_FILE);
    if let Ok(bytes) = fs::read(&index) {
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            let mut shards: Vec<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                let p = dir.join(s);
                if is_safe_file_name(s) && p.is_file() {
                    out.push(p);
                }
            }
        }
        out.push(index);
    }
    out
}

fn delete_source_weights(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for p in existing_source_weights(dir) {
        if remove_if_exists(&p)? {
            n += 1;
        }
    }
    fsutil::sync_dir(dir)?;
    Ok(n)
}

/// Verifies `m` against the files, marks the manifest `original_deleted` (durably) and then
/// deletes the source weights. Marking first means a crash mid-deletion still leaves a split that
/// is recognized as the only copy.
fn verify_and_delete_original(
    checkpoint_dir: &Path,
    out: &Path,
    mut m: Manifest,
    buf: &mut Vec<u8>,
    on_event: &mut dyn FnMut(&SplitEvent),
) -> Result<()> {
    verify_against(out, &m, buf).into_result(out)?;
    on_event(&SplitEvent::Verified);
    m.original_deleted = true;
    write_atomic(&out.join(MANIFEST_FILE), &m.to_json())?;
    let files = delete_source_weights(checkpoint_dir)?;
    on_event(&SplitEvent::OriginalDeleted { files });
    Ok(())
}

fn reuse(
    checkpoint_dir: &Path,
    out: PathBuf,
    opts: &SplitOptions,
    on_event: &mut dyn FnMut(&SplitEvent),
) -> Result<(PathBuf, SplitOutcome)> {
    on_event(&SplitEvent::Reused);
    if opts.delete_original && !existing_source_weights(checkpoint_dir).is_empty() {
        let _lock = DirLock::acquire(&out)?;
        let m = Manifest::load(&out)?;
        verify_and_delete_original(checkpoint_dir, &out, m, &mut Vec::new(), on_event)?;
    }
    Ok((out, SplitOutcome::Reused))
}

/// Splits a checkpoint into per-unit files (or reuses a current split). Returns the split
/// directory and what was done. Streams: at most [`COPY_CHUNK`] bytes of tensor data are in
/// memory at a time. Safe to interrupt at any point and rerun.
pub fn split(
    checkpoint_dir: &Path,
    layout: &Layout,
    opts: &SplitOptions,
    on_event: &mut dyn FnMut(&SplitEvent),
) -> Result<(PathBuf, SplitOutcome)> {
    check_alignment(opts.alignment)?;
    layout.validate()?;
    read_config_json(checkpoint_dir)?;
    let out = opts.split_dir(checkpoint_dir);
    if is_current(&out, checkpoint_dir, layout, opts)? {
        return reuse(checkpoint_dir, out, opts, on_event);
    }

    // Read-only validation and planning first: bad input leaves the disk untouched.
    let ckpt = match Checkpoint::open(checkpoint_dir) {
        Ok(c) => c,
        Err(e @ (SplitError::MissingWeights { .. } | SplitError::MissingShard { .. })) => {
            // Explain the common trap: originals deleted, split no longer matching.
            if let Ok(m) = Manifest::load(&out) {
                if m.original_deleted {
                    let reason = stale_reason(&out, checkpoint_dir, layout, opts)?
                        .unwrap_or_else(|| "it is incomplete".into());
                    return Err(SplitError::SourceDeleted {
                        dir: checkpoint_dir.to_path_buf(),
                        split_dir: out.clone(),
                        reason,
                    });
                }
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let fingerprint = ckpt.fingerprint()?;
    let units = plan_units(&ckpt, layout, opts, &fingerprint, &out)?;

    fs::create_dir_all(&out).map_err(|e| SplitError::io(&out, e))?;
    let lock = DirLock::acquire(&out)?;
    // Another process may have completed the split while we waited for the lock.
    if is_current(&out, checkpoint_dir, layout, opts)? {
        drop(lock);
        drop(ckpt);
        return reuse(checkpoint_dir, out, opts, on_event);
    }
    refuse_to_overwrite_source(&ckpt, &out, &units)?;
    let plan = Plan {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        source_fingerprint: fingerprint.clone(),
        layout_digest: layout.digest(),
        options: opts.settings(),
        units: units
            .iter()
            .map(|u| PlanUnit {
                name: u.spec.name.clone(),
                file: u.file.clone(),
                size: u.header.file_size(),
                header_digest: crate::writer::format_checksum(xxhash_rust::xxh3::xxh3_64(
                    &u.header.bytes,
                )),
            })
            .collect(),
    };

    // 1. The directory no longer holds a complete split until the new manifest is renamed in.
    let manifest_path = out.join(MANIFEST_FILE);
    let old_manifest_files: Vec<String> = fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        .map(|m| m.units.into_iter().map(|u| u.file).collect())
        .unwrap_or_default();
    if remove_if_exists(&manifest_path)? {
        fsutil::sync_dir(&out)?;
    }
    // 2. Leftovers of interrupted writes.
    remove_stray_tmp(&out)?;
    // 3. Unit files from a different split (other source, options or layout) are removed; only a
    //    matching plan lets existing unit files be reused.
    let old_plan = read_plan(&out);
    if old_plan.as_ref() != Some(&plan) {
        let mut stale: Vec<String> = old_manifest_files;
        if let Some(old) = &old_plan {
            stale.extend(old.units.iter().map(|u| u.file.clone()));
        }
        stale.extend(plan.units.iter().map(|u| u.file.clone()));
        for f in stale.iter().filter(|f| is_safe_file_name(f)) {
            remove_if_exists(&out.join(f))?;
        }
        fsutil::sync_dir(&out)?;
        let mut json = serde_json::to_vec_pretty(&plan).expect("plan serializes");
        json.push(b'\n');
        write_atomic(&out.join(PLAN_FILE), &json)?;
    }

    // 4. What is already there, what remains, and is there room for it?
    let done = units
        .iter()
        .map(|u| unit_file_matches(&u.path, &u.header))
        .collect::<Result<Vec<bool>>>()?;
    let already_done = done.iter().filter(|d| **d).count();
    let needed: u64 = units
        .iter()
        .zip(&done)
        .filter(|(_, d)| !**d)
        .map(|(u, _)| u.header.file_size())
        .sum();
    let available = fsutil::available_space(&out)?;
    if needed > available {
        return Err(SplitError::NoSpace {
            dir: out.clone(),
            needed,
            available,
        });
    }
    on_event(&SplitEvent::Planned {
        units: units.len(),
        bytes: needed,
        already_done,
    });

    // 5. Write the missing units.
    let total = units.len();
    let mut buf = Vec::new();
    let mut entries = Vec::with_capacity(total);
    let (mut bytes_written, mut units_written, mut units_resumed) = (0u64, 0usize, 0usize);
    for (index, (u, is_done)) in units.iter().zip(&done).enumerate() {
        let (size, checksum) = if *is_done {
            units_resumed += 1;
            file_checksum(&u.path, &mut buf)?
        } else {
            let w = write_unit(&ckpt, u, &mut buf)?;
            units_written += 1;
            bytes_written += w.size;
            on_event(&SplitEvent::UnitDone {
                index,
                total,
                name: u.spec.name.clone(),
                bytes: w.size,
            });
            (w.size, w.checksum)
        };
        entries.push(UnitEntry {
            name: u.spec.name.clone(),
            kind: u.spec.kind,
            file: u.file.clone(),
            size,
            checksum,
            data_offset: u.header.data_offset,
            data_len: u.header.data_len,
            tensors: u
                .pieces
                .iter()
                .zip(&u.header.offsets)
                .map(|(p, &(s, e))| TensorEntry {
                    name: p.out.name.clone(),
                    dtype: p.out.dtype,
                    shape: p.out.shape.clone(),
                    offset: s,
                    len: e - s,
                })
                .collect(),
            quantized: u.quantized.clone(),
        });
    }
    drop(buf);

    // 6. The manifest marks the split complete.
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        architecture: layout.architecture.clone(),
        source_fingerprint: fingerprint,
        layout_digest: plan.layout_digest.clone(),
        options: opts.settings(),
        tied_lm_head: layout.tied_lm_head,
        original_deleted: false,
        units: entries,
    };
    drop(ckpt);
    if opts.delete_original {
        verify_and_delete_original(checkpoint_dir, &out, manifest, &mut Vec::new(), on_event)?;
    } else {
        write_atomic(&manifest_path, &manifest.to_json())?;
    }
    drop(lock);
    Ok((
        out,
        SplitOutcome::Written {
            bytes_written,
            units_written,
            units_resumed,
        },
    ))
}

/// Fast check (stat calls and a manifest read, no tensor data) that `split_dir` holds a complete
/// split of `checkpoint_dir` made with this layout and these options: manifest present and
/// matching, every unit file present with its recorded size, and the source fingerprint
/// unchanged — or the source weights deleted by a previous `delete_original` split.
pub fn is_current(
    split_dir: &Path,
    checkpoint_dir: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> Result<bool> {
    Ok(stale_reason(split_dir, checkpoint_dir, layout, opts)?.is_none())
}

/// Why the split in `split_dir` cannot be reused (`None` when it can); same checks as
/// [`is_current`], for messages and logs.
pub fn stale_reason(
    split_dir: &Path,
    checkpoint_dir: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> Result<Option<String>> {
    let m = match Manifest::load(split_dir) {
        Ok(m) => m,
        Err(e @ (SplitError::MissingManifest { .. } | SplitError::BadManifest { .. })) => {
            return Ok(Some(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    if m.options != opts.settings() {
        return Ok(Some(format!(
            "it was made with different options ({:?}, now {:?})",
            m.options,
            opts.settings()
        )));
    }
    if m.layout_digest != layout.digest()
        || m.architecture != layout.architecture
        || m.tied_lm_head != layout.tied_lm_head
        || m.units.len() != layout.units.len()
        || m.units
            .iter()
            .zip(&layout.units)
            .any(|(u, s)| u.name != s.name || u.kind != s.kind)
    {
        return Ok(Some(format!(
            "it was made with a different {} layout",
            m.architecture
        )));
    }
    for u in &m.units {
        let p = split_dir.join(&u.file);
        match fs::metadata(&p) {
            Ok(md) if md.is_file() && md.len() == u.size => {}
            Ok(md) => {
                return Ok(Some(format!(
                    "{} is {} bytes, the manifest says {}",
                    p.display(),
                    md.len(),
                    u.size
                )))
            }
            Err(_) => return Ok(Some(format!("{} is missing", p.display()))),
        }
    }
    match source_fingerprint(checkpoint_dir) {
        Ok(fp) if fp == m.source_fingerprint => Ok(None),
        Ok(_) => Ok(Some(format!(
            "the checkpoint in {} changed since it was split",
            checkpoint_dir.display()
        ))),
        Err(e @ (SplitError::MissingConfig { .. } | SplitError::BadConfig { .. })) => Err(e),
        Err(e @ (SplitError::MissingWeights { .. } | SplitError::MissingShard { .. })) => {
            if m.original_deleted {
                Ok(None)
            } else {
                Ok(Some(e.to_string()))
            }
        }
        // Anything else wrong with the source: not reusable; `split` reports the real error.
        Err(e) => Ok(Some(e.to_string())),
    }
}
