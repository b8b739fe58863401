//! The splitter's error type. Every variant names the file, tensor or directory involved, because
//! the person reading the message has to be able to find and fix the problem without a debugger.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T, E = SplitError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading a checkpoint, writing or checking a split.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// The checkpoint directory has no `config.json`.
    #[error("missing config.json in {}: is this a Hugging Face model directory?", dir.display())]
    MissingConfig {
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// `config.json` exists but is not valid JSON.
    #[error("cannot parse {}: {reason}", file.display())]
    BadConfig {
        /// Path of the config file.
        file: PathBuf,
        /// Parser message.
        reason: String,
    },
    /// None of `model.safetensors`, `model.safetensors.index.json`, `pytorch_model.bin` and
    /// `pytorch_model.bin.index.json` exists.
    #[error(
        "no weights in {}: expected model.safetensors, model.safetensors.index.json, \
         pytorch_model.bin or pytorch_model.bin.index.json",
        dir.display()
    )]
    MissingWeights {
        /// Checkpoint directory.
        dir: PathBuf,
    },
    /// The shard index is not valid.
    #[error("invalid shard index {}: {reason}", index.display())]
    BadIndex {
        /// Path of `model.safetensors.index.json` (or `pytorch_model.bin.index.json`).
        index: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The shard index names a weight file that does not exist.
    #[error("{} lists shard {shard}, but that file does not exist", index.display())]
    MissingShard {
        /// Path of the index.
        index: PathBuf,
        /// Shard file name as written in the index.
        shard: String,
    },
    /// The shard index places a tensor in a shard that does not contain it.
    #[error("{} places tensor {tensor} in {shard}, but that file does not contain it", index.display())]
    TensorNotInShard {
        /// Path of the index.
        index: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Shard file name.
        shard: String,
    },
    /// A safetensors header is unreadable (not JSON, impossible length, ...).
    #[error("corrupt safetensors header in {}: {reason}", file.display())]
    BadHeader {
        /// The safetensors file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight file is shorter than its header (or zip directory) says.
    #[error(
        "{} is truncated: its header describes {expected} bytes but the file has {actual} (incomplete download?)",
        file.display()
    )]
    Truncated {
        /// The weight file.
        file: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A tensor uses a dtype string this crate does not know.
    #[error("tensor {tensor} in {} has unknown dtype {dtype:?}", file.display())]
    UnknownDtype {
        /// The safetensors file.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// A PyTorch checkpoint (`.bin`) cannot be read: not a `torch.save` zip archive, truncated,
    /// compressed records, a malformed pickle, or a pickle that is not a state dict of tensors.
    #[error("cannot read PyTorch checkpoint {}: {reason}", file.display())]
    BadTorchFile {
        /// The `.bin` file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A PyTorch checkpoint in the format of `torch.save` before torch 1.6 (a bare pickle
    /// stream), which cannot be read without executing it.
    #[error(
        "{} is in the legacy PyTorch format (torch.save before torch 1.6); re-save it with \
         torch >= 1.6 or convert it to safetensors",
        file.display()
    )]
    LegacyTorchFormat {
        /// The `.bin` file.
        file: PathBuf,
    },
    /// The pickle of a PyTorch checkpoint refers to a Python global that a state dict of
    /// tensors does not use (it would run code if unpickled by Python).
    #[error(
        "refusing {}: its pickle refers to the Python global {global}, which is not part of a \
         state dict of tensors (nothing in the pickle is executed); convert the checkpoint to \
         safetensors if it is trusted",
        file.display()
    )]
    ForbiddenGlobal {
        /// The `.bin` file.
        file: PathBuf,
        /// `module.name` of the global.
        global: String,
    },
    /// A tensor was asked for by name but the checkpoint has none of that name.
    #[error("no tensor {tensor} in the checkpoint at {}", dir.display())]
    NoSuchTensor {
        /// Checkpoint directory.
        dir: PathBuf,
        /// Requested name.
        tensor: String,
    },
    /// A tensor's header entry is inconsistent (bad shape, offsets out of range, overlap, ...),
    /// or a PyTorch tensor cannot be read as one byte range (not contiguous, past its storage).
    #[error("tensor {tensor} in {}: {reason}", file.display())]
    BadTensor {
        /// The weight file.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same tensor name appears in two weight files.
    #[error("tensor {tensor} appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        /// Tensor name.
        tensor: String,
        /// First file holding it.
        first: PathBuf,
        /// Second file holding it.
        second: PathBuf,
    },
    /// The layout given to the splitter is itself inconsistent (a bug in the architecture code).
    #[error("invalid layout for {architecture}: {reason}")]
    InvalidLayout {
        /// Architecture name of the layout.
        architecture: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Checkpoint tensors that no unit of the layout claims and that are not ignored.
    #[error(
        "{} checkpoint tensor(s) do not fit the {architecture} layout (wrong architecture or unsupported variant?): {}",
        names.len(),
        list_names(names)
    )]
    UnclaimedTensors {
        /// Architecture name of the layout.
        architecture: String,
        /// The unclaimed tensor names, sorted.
        names: Vec<String>,
    },
    /// A unit's required tensor is not in the checkpoint.
    #[error("unit {unit} needs tensor {tensor}, which is not in the checkpoint")]
    MissingTensor {
        /// Unit name (e.g. `layer.003`).
        unit: String,
        /// Missing tensor name.
        tensor: String,
    },
    /// A checkpoint tensor's shape is not the one config.json implies (nothing is written).
    #[error("{}: tensor {tensor} has shape {found:?}, but config.json implies {expected:?}", file.display())]
    TensorShape {
        /// Weight file holding it.
        file: std::path::PathBuf,
        /// Tensor name.
        tensor: String,
        /// Its shape in the checkpoint.
        found: Vec<usize>,
        /// The shape the model's config implies.
        expected: Vec<usize>,
    },
    /// Invalid [`crate::SplitOptions`].
    #[error("invalid split options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: String,
    },
    /// Not enough free space for the split (checked before writing anything).
    #[error(
        "not enough disk space in {}: the split needs {} but only {} are available",
        dir.display(),
        human_bytes(*needed),
        human_bytes(*available)
    )]
    NoSpace {
        /// Output directory.
        dir: PathBuf,
        /// Bytes still to write.
        needed: u64,
        /// Bytes available to this user.
        available: u64,
    },
    /// The disk filled up while writing a file.
    #[error("disk full while writing {}: {source}", path.display())]
    DiskFull {
        /// File being written.
        path: PathBuf,
        /// Underlying error (ENOSPC / EDQUOT).
        #[source]
        source: io::Error,
    },
    /// A path that must be a regular file is something else (a FIFO would block a reader
    /// forever, a directory cannot be read as one).
    #[error("{} is {kind}, not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead (`a directory`, `a FIFO (named pipe)`, ...).
        kind: &'static str,
    },
    /// The split's output directory holds files that are not a split of ours.
    #[error(
        "refusing to write the split into {}: it is not empty and holds no rabbit split (found {found}); choose a new or empty directory",
        dir.display()
    )]
    ForeignDirectory {
        /// The directory.
        dir: PathBuf,
        /// Some of its entries.
        found: String,
    },
    /// A path that must be a directory is something else.
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A writer was fed the wrong number of bytes (programming error in the caller).
    #[error("writing {}: {reason}", file.display())]
    WriterMisuse {
        /// File being written.
        file: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The split directory has no manifest (never completed, or not a split).
    #[error("no manifest.json in {}: the split is missing or incomplete", dir.display())]
    MissingManifest {
        /// Split directory.
        dir: PathBuf,
    },
    /// The manifest exists but cannot be used.
    #[error("invalid split manifest {}: {reason}", file.display())]
    BadManifest {
        /// Manifest path.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The source weights were deleted after an earlier split, and that split cannot serve this
    /// request (other layout or options, or damaged).
    #[error(
        "the original weights in {} were deleted after splitting them into {}, but that split \
         cannot be used: {reason}; download the model again to re-split it",
        dir.display(),
        split_dir.display()
    )]
    SourceDeleted {
        /// Checkpoint directory.
        dir: PathBuf,
        /// Split directory.
        split_dir: PathBuf,
        /// Why the existing split does not fit.
        reason: String,
    },
    /// The source weights are missing (not deleted by us), and the existing split cannot be used.
    #[error(
        "{} has no weights to split (expected model.safetensors, model.safetensors.index.json, \
         pytorch_model.bin or pytorch_model.bin.index.json), \
         and the existing split in {} cannot be used: {reason}; put the original weights back (or \
         download them again) to repair it",
        dir.display(),
        split_dir.display()
    )]
    SourceMissing {
        /// Checkpoint directory.
        dir: PathBuf,
        /// Split directory.
        split_dir: PathBuf,
        /// Why the existing split does not fit.
        reason: String,
    },
    /// `delete_original` would leave another split of the same weights unusable or unrepairable.
    #[error(
        "not deleting the original weights in {}: the split in {} was made from them too, and {reason}",
        dir.display(),
        split_dir.display()
    )]
    DependentSplit {
        /// Checkpoint directory.
        dir: PathBuf,
        /// The other split.
        split_dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The output directory holds the split of other weights whose originals were deleted
    /// (`delete_original`): it is the only copy of that model, and splitting into it would
    /// destroy it.
    #[error(
        "refusing to split {} into {}: that directory holds a split made from other weights, \
         whose original weights were deleted (--delete-original), so it is the only copy of its \
         model and splitting into it would destroy it; choose another directory, or delete {} by \
         hand if that model is no longer needed (for instance because these are its weights \
         downloaded again)",
        dir.display(),
        split_dir.display(),
        split_dir.display()
    )]
    OnlyCopy {
        /// Checkpoint directory being split.
        dir: PathBuf,
        /// The output directory holding the other split.
        split_dir: PathBuf,
    },
    /// Files of a split are missing or corrupt.
    #[error("split in {} is damaged: {}", dir.display(), list_damage(damaged))]
    Damaged {
        /// Split directory.
        dir: PathBuf,
        /// Every damaged file with its problem.
        damaged: Vec<Damage>,
    },
}

/// One damaged file found by [`crate::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The damaged (or missing) file.
    pub file: PathBuf,
    /// Human-readable description of the problem.
    pub problem: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.problem)
    }
}

impl SplitError {
    /// Wraps an I/O error with the path it concerns; disk-full conditions get their own variant.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> SplitError {
        let path = path.as_ref().to_path_buf();
        match source.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::NOSPC.raw_os_error()
                    || code == rustix::io::Errno::DQUOT.raw_os_error() =>
            {
                SplitError::DiskFull { path, source }
            }
            _ => SplitError::Io { path, source },
        }
    }
}

/// Formats a byte count for people (`1.50 GiB (1610612736 bytes)`).
pub fn human_bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} bytes");
    }
    format!("{} ({n} bytes)", bytesize::ByteSize(n).display().iec())
}

fn list_names(names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

fn list_damage(damaged: &[Damage]) -> String {
    damaged
        .iter()
        .map(Damage::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB (3221225472 bytes)");
    }

    #[test]
    fn enospc_maps_to_disk_full() {
        let e = SplitError::io("/x/y", io::Error::from(rustix::io::Errno::NOSPC));
        assert!(matches!(e, SplitError::DiskFull { .. }), "{e:?}");
        assert!(e.to_string().contains("/x/y"));
        let e = SplitError::io("/x/y", io::Error::from(rustix::io::Errno::ACCESS));
        assert!(matches!(e, SplitError::Io { .. }), "{e:?}");
    }

    #[test]
    fn unclaimed_list_is_capped() {
        let names: Vec<String> = (0..15).map(|i| format!("t{i}")).collect();
        let msg = SplitError::UnclaimedTensors {
            architecture: "X".into(),
            names,
        }
        .to_string();
        assert!(msg.starts_with("15 checkpoint tensor(s)"), "{msg}");
        assert!(msg.contains("t9") && !msg.contains("t10,") && msg.ends_with("and 5 more"));
    }
}
