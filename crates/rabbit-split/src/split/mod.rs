//! The splitter: checkpoint + layout -> one aligned safetensors file per unit + manifest.
//!
//! Crash-safety protocol (details in docs/FORMAT.md): decide what to write and check free space
//! before touching anything; remove any old manifest (or, when repairing a damaged split of the
//! same plan, only the damaged files), clean stray temporaries, write `split.plan.json`, write
//! each missing unit to a temporary file, fsync, rename, and write `manifest.json` last. A rerun
//! after a crash reuses every unit file whose header and size match the plan and writes the
//! rest, producing the same bytes as an uninterrupted run.

mod dir;
mod options;
mod original;
mod plan;
mod stale;
mod write;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{read_config_json, Checkpoint};
use crate::error::{Result, SplitError};
use crate::fsutil::{self, remove_if_exists, write_atomic, DirLock};
use crate::integrity::{self, Checksums};
use crate::layout::Layout;
use crate::manifest::{
    Manifest, TensorEntry, UnitEntry, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, PLAN_FILE,
};
use crate::writer::{check_alignment, file_checksum};

use dir::{
    is_safe_file_name, refuse_foreign_dir, refuse_to_destroy_only_copy, refuse_to_overwrite_source,
    remove_stray_tmp,
};
pub use options::{
    default_split_dir, default_split_dir_for, SplitEvent, SplitOptions, SplitOutcome,
};
use original::{
    dependent_splits, existing_source_weights, finish_deleting_original,
    verify_and_delete_original, DepCheck,
};
pub(crate) use plan::resolve_units;
use plan::{plan_units, read_plan, unit_file_matches, Plan, PlanUnit};
pub use stale::{is_current, stale_reason};
use write::write_unit;

/// Largest chunk of tensor data held in memory while copying (the buffer is reused).
pub const COPY_CHUNK: usize = 16 << 20;

/// Default data-region alignment: a page, and a multiple of every O_DIRECT block size in use.
pub const DEFAULT_ALIGNMENT: u64 = 4096;

/// Name of the split directory created inside the checkpoint directory by default.
pub const DEFAULT_SPLIT_DIR_NAME: &str = "rabbit-split";
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
        if m.original_deleted {
            // A deletion that stopped partway: everything was verified and marked before it
            // began, and the partial weights can no longer be checked against anything.
            finish_deleting_original(checkpoint_dir, on_event)?;
        } else {
            verify_and_delete_original(checkpoint_dir, &out, m, on_event)?;
        }
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
    if fs::metadata(&out).is_ok_and(|md| !md.is_dir()) {
        return Err(SplitError::NotADirectory { path: out });
    }
    if is_current(&out, checkpoint_dir, layout, opts)? {
        return reuse(checkpoint_dir, out, opts, on_event);
    }

    // Read-only validation and planning first: bad input leaves the disk untouched.
    let ckpt = match Checkpoint::open_for(checkpoint_dir, layout) {
        Ok(c) => c,
        Err(e @ (SplitError::MissingWeights { .. } | SplitError::MissingShard { .. })) => {
            // Explain the common trap: originals deleted, split no longer matching.
            // Or the weights were moved away from a split that is now damaged: say so too.
            if let Ok(m) = Manifest::load(&out) {
                // Damage is the likely reason and the useful one to name; else why it is stale.
                let report =
                    crate::integrity::check(&out, &m, crate::integrity::Checksums::Changed);
                let damage = report
                    .damaged
                    .first()
                    .map(|d| format!("{} damaged file(s), first {d}", report.damaged.len()));
                let (dir, split_dir) = (checkpoint_dir.to_path_buf(), out.clone());
                if m.original_deleted {
                    let reason = match damage {
                        Some(d) => d,
                        None => stale_reason(&out, checkpoint_dir, layout, opts)?
                            .unwrap_or_else(|| "it is incomplete".into()),
                    };
                    return Err(SplitError::SourceDeleted {
                        dir,
                        split_dir,
                        reason,
                    });
                }
                if let Some(reason) = damage {
                    return Err(SplitError::SourceMissing {
                        dir,
                        split_dir,
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

    let files: Vec<&str> = units.iter().map(|u| u.file.as_str()).collect();
    refuse_foreign_dir(&out, checkpoint_dir, &files)?;
    refuse_to_destroy_only_copy(&out, checkpoint_dir, &fingerprint)?;
    if opts.delete_original {
        // Fail fast: a damaged (or busy) split of the same weights would make the deletion
        // refuse at the end; say so before hours of writing. The locks are not kept: the full
        // check before the deletion takes them again.
        drop(dependent_splits(checkpoint_dir, &out, DepCheck::Cheap)?);
    }
    let created = fs::symlink_metadata(&out).is_err();
    fs::create_dir_all(&out).map_err(|e| SplitError::io(&out, e))?;
    let lock = DirLock::acquire(&out)?;
    // Another process may have completed the split while we waited for the lock.
    if is_current(&out, checkpoint_dir, layout, opts)? {
        drop(lock);
        drop(ckpt);
        return reuse(checkpoint_dir, out, opts, on_event);
    }
    // Another process may have put such a split here while we waited.
    refuse_to_destroy_only_copy(&out, checkpoint_dir, &fingerprint)?;
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

    // What is already there and what remains, decided before anything on disk changes.
    let manifest_path = out.join(MANIFEST_FILE);
    let old_plan = read_plan(&out);
    let same_plan = old_plan.as_ref() == Some(&plan);
    let old_manifest = Manifest::load(&out).ok();
    // Repair: the manifest describes exactly this split, so it stays valid throughout (the
    // rewritten units get the bytes it records) and only damaged or missing units are redone.
    let repair = old_manifest
        .as_ref()
        .filter(|m| same_plan && describes(m, &plan));
    let mut damaged: Vec<PathBuf> = Vec::new();
    if let Some(m) = repair {
        let report = integrity::check(&out, m, Checksums::Changed);
        damaged = report.damaged.into_iter().map(|d| d.file).collect();
    }
    let done = units
        .iter()
        .map(|u| {
            Ok(same_plan && !damaged.contains(&u.path) && unit_file_matches(&u.path, &u.header)?)
        })
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
        drop(lock);
        if created {
            // Nothing was written: leave no empty directory behind (fails, harmlessly, if
            // another process has put something in it meanwhile).
            let _ = fs::remove_dir(&out);
        }
        return Err(SplitError::NoSpace {
            dir: out.clone(),
            needed,
            available,
        });
    }
    if repair.is_some() {
        // 1. Damaged files go before anything is rewritten: a crash cannot leave one behind.
        for p in &damaged {
            remove_if_exists(p)?;
        }
        fsutil::sync_dir(&out)?;
    } else {
        // 1. The directory no longer holds a complete split until the new manifest is renamed in.
        if remove_if_exists(&manifest_path)? {
            fsutil::sync_dir(&out)?;
        }
    }
    // 2. Leftovers of interrupted writes.
    remove_stray_tmp(&out)?;
    // 3. Unit files from a different split (other source, options or layout) are removed; only a
    //    matching plan lets existing unit files be reused.
    if !same_plan {
        let mut stale: Vec<String> = old_manifest
            .iter()
            .flat_map(|m| m.units.iter().map(|u| u.file.clone()))
            .collect();
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
    on_event(&SplitEvent::Planned {
        units: units.len(),
        bytes: needed,
        already_done,
    });

    // Checksums of kept units: from the manifest they were just verified against, else read.
    let known: BTreeMap<&str, &str> = repair
        .map(|m| {
            m.units
                .iter()
                .map(|u| (u.file.as_str(), u.checksum.as_str()))
                .collect()
        })
        .unwrap_or_default();

    // 5. Write the missing units.
    let total = units.len();
    let mut buf = Vec::new();
    let mut entries = Vec::with_capacity(total);
    let (mut bytes_written, mut units_written, mut units_resumed) = (0u64, 0usize, 0usize);
    for (index, (u, is_done)) in units.iter().zip(&done).enumerate() {
        let (size, checksum) = if *is_done {
            units_resumed += 1;
            match known.get(u.file.as_str()) {
                Some(sum) => (u.header.file_size(), sum.to_string()),
                None => file_checksum(&u.path, &mut buf)?,
            }
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
    // Written even when the originals are to be deleted: should the deletion refuse (a damaged
    // dependent split), the split just made is complete and usable.
    write_atomic(&manifest_path, &manifest.to_json())?;
    // Every unit was written or checked just now: later opens need not read them again.
    let _ = integrity::record_verified(
        &out,
        manifest
            .units
            .iter()
            .map(|u| (u.file.as_str(), u.checksum.as_str())),
    );
    if opts.delete_original {
        verify_and_delete_original(checkpoint_dir, &out, manifest, on_event)?;
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

/// Whether `m` is the manifest of exactly the split `plan` describes (same source, options,
/// layout and unit files).
fn describes(m: &Manifest, plan: &Plan) -> bool {
    m.source_fingerprint == plan.source_fingerprint
        && m.options == plan.options
        && m.layout_digest == plan.layout_digest
        && m.units.len() == plan.units.len()
        && m.units
            .iter()
            .zip(&plan.units)
            .all(|(u, p)| u.name == p.name && u.file == p.file && u.size == p.size)
}
