//! Where the layers stream from: the checkpoint's own weight files (in place, the default), or a
//! per-layer split where one pays.
//!
//! Measured on the qwen2.5-1.5b shape (docs/BENCHMARKS.md, issue 19): streaming in place decodes
//! as fast as the split from the page cache and from the disk, and its first token comes ~10×
//! sooner on a fresh download (the split copies the whole model first, and needs its size again
//! in free space). So a split is made only when something needs one: compression (quantised bytes
//! on disk), `--delete-original`, `--verify-split`, an explicit `--split-dir` or `--split`, or a
//! checkpoint whose tensors are off their natural alignment (old safetensors writers) or packed
//! in another row order (InternLM2's `wqkv`): in place those would be copied, or regrouped, on
//! every sweep (measured 1.5× slower decode for InternLM2). A split of the same weights already
//! at the default place is used (and repaired if damaged); one of other weights (the checkpoint
//! changed since) is left alone. A split that would not fit on the disk streams in place instead, unless
//! compression, `--delete-original` or `--verify-split` needs it; so does a split made only for
//! speed that cannot be written (a read-only checkpoint directory).

use std::path::{Path, PathBuf};

use rabbit_split::{InPlace, Layout, SplitError, SplitEvent, SplitOptions, SplitOutcome};

use crate::error::{Error, Result};
use crate::model::{LoadEvent, LoadOptions};

/// Whether to split a checkpoint before streaming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitPolicy {
    /// Stream in place unless a split pays or an option needs one (see the module docs).
    #[default]
    Auto,
    /// Always stream from a split (made on first use); `--split`.
    Always,
    /// Never split: stream from the checkpoint's files; options that need a split are refused.
    /// `--no-split`.
    Never,
}

/// What the layers will be read from.
pub(crate) enum Source {
    /// A split directory (current: made or reused).
    Split(PathBuf),
    /// The checkpoint's own files.
    InPlace(Box<InPlace>),
}

/// Why an option needs a split, if one does.
fn needs_split(opts: &LoadOptions) -> Option<&'static str> {
    if opts.compression.is_some() {
        Some("--compression (compressed layers are written by the split)")
    } else if opts.delete_original {
        Some("--delete-original (without a split the original weights are the only copy)")
    } else if opts.split_dir.is_some() {
        Some("--split-dir (no split is read or written)")
    } else if opts.verify_split {
        Some("--verify-split (there is no split to verify)")
    } else {
        None
    }
}

/// Whether `out` holds a split of this checkpoint as it is now (same weights, layout and
/// options; damage aside), or one whose originals were deleted. A split of other weights (the
/// checkpoint changed since) is not redone: streaming in place needs no copy.
fn split_of_this_checkpoint(
    out: &Path,
    checkpoint: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> bool {
    let Ok(m) = rabbit_split::Manifest::load(out) else {
        return false;
    };
    if m.original_deleted {
        return true;
    }
    if m.options != opts.settings() || m.layout_digest != layout.digest() {
        return false;
    }
    match rabbit_split::source_fingerprint(checkpoint) {
        Ok(fp) => fp == m.source_fingerprint,
        // No weights to stream in place (moved away?): the split's errors explain best.
        Err(_) => true,
    }
}

/// Whether a split that cannot be written may be done without (see [`prepare`]).
fn can_do_without_split(opts: &LoadOptions) -> bool {
    opts.compression.is_none() && !opts.delete_original && !opts.verify_split
}

/// Whether some tensor of the checkpoint is not aligned for its dtype in its file.
fn misaligned(plan: &InPlace) -> bool {
    plan.manifest.units.iter().zip(&plan.regions).any(|(u, r)| {
        u.tensors.iter().any(|t| {
            r.locate(t.offset, t.len)
                .is_none_or(|(_, at)| !at.is_multiple_of(t.dtype.size_bytes().max(1) as u64))
        })
    })
}

/// Decides where to stream `checkpoint` from and prepares it: plans it in place, or splits it
/// (or reuses its split) into `split_dir` (`None`: the default place).
pub(crate) fn prepare(
    checkpoint: &Path,
    split_dir: Option<PathBuf>,
    layout: &Layout,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(&LoadEvent),
) -> Result<Source> {
    let in_place = |reason: String, progress: &mut dyn FnMut(&LoadEvent)| -> Result<Source> {
        let plan = rabbit_split::plan_in_place(checkpoint, layout)?;
        progress(&LoadEvent::InPlace { reason });
        Ok(Source::InPlace(Box::new(plan)))
    };
    let split_opts = SplitOptions {
        out_dir: split_dir,
        delete_original: opts.delete_original,
        compression: opts.compression,
        compress_embeddings: opts.compress_embeddings,
        ..SplitOptions::default()
    };
    match opts.split {
        SplitPolicy::Never => {
            if let Some(c) = needs_split(opts) {
                return Err(Error::InvalidInput(format!(
                    "--no-split cannot be combined with {c}"
                )));
            }
            return in_place(
                "streaming straight from the checkpoint's files, no split (--no-split)".into(),
                progress,
            );
        }
        SplitPolicy::Auto if needs_split(opts).is_none() => {
            let out = split_opts.split_dir(checkpoint);
            // A split of this checkpoint made here before (`rabbit split`, `--split`, an older
            // rabbitllm) is as fast and checksummed: used (and repaired if damaged).
            if !split_of_this_checkpoint(&out, checkpoint, layout, &split_opts) {
                let plan = rabbit_split::plan_in_place(checkpoint, layout)?;
                if !misaligned(&plan) && plan.row_orders.is_empty() {
                    progress(&LoadEvent::InPlace {
                        reason: "streaming straight from the checkpoint's files (no split \
                                 needed; --split makes one)"
                            .into(),
                    });
                    return Ok(Source::InPlace(Box::new(plan)));
                }
                tracing::info!(
                    "the checkpoint's tensors are misaligned or packed in another row order: \
                     splitting it (a split stores them as they are used)"
                );
            }
        }
        SplitPolicy::Auto | SplitPolicy::Always => {}
    }
    let mut on_event = |e: &SplitEvent| progress(&LoadEvent::Split(e.clone()));
    match rabbit_split::split(checkpoint, layout, &split_opts, &mut on_event) {
        Ok((dir, outcome)) => {
            if let SplitOutcome::Written { .. } = outcome {
                tracing::info!(dir = %dir.display(), "split written");
            }
            Ok(Source::Split(dir))
        }
        // Splitting needs the model's size again in free space; streaming in place needs none.
        // Compression and --delete-original cannot do without the split, and --verify-split
        // asks to check one: their error stands.
        Err(SplitError::NoSpace {
            dir,
            needed,
            available,
        }) if can_do_without_split(opts) => {
            let reason = format!(
                "the split would need {} in {} but only {} are free: streaming straight from \
                 the checkpoint's files instead (as --no-split)",
                rabbit_split::error::human_bytes(needed),
                dir.display(),
                rabbit_split::error::human_bytes(available)
            );
            tracing::warn!("{reason}");
            in_place(reason, progress)
        }
        // A split chosen only for speed (nobody asked for one) that cannot be written where it
        // goes (a read-only checkpoint directory): stream in place.
        Err(SplitError::Io { path, source })
            if opts.split == SplitPolicy::Auto
                && needs_split(opts).is_none()
                && matches!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
        {
            let reason = format!(
                "cannot write a split at {} ({source}): streaming straight from the \
                 checkpoint's files instead (as --no-split)",
                path.display()
            );
            tracing::warn!("{reason}");
            in_place(reason, progress)
        }
        Err(e) => Err(e.into()),
    }
}
