//! What a split is asked to do ([`SplitOptions`]), what it reports ([`SplitEvent`]) and what it
//! did ([`SplitOutcome`]), and where splits go by default.

use std::path::{Path, PathBuf};

use crate::checkpoint::TensorLoc;
use crate::layout::UnitKind;
use crate::manifest::SplitSettings;
use crate::quant::{self, Compression, QUANT_BLOCK};

use super::{DEFAULT_ALIGNMENT, DEFAULT_SPLIT_DIR_NAME};

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
