//! Errors of the executor.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Splitting or reading the per-layer files failed.
    #[error(transparent)]
    Split(#[from] rabbit_split::SplitError),
    /// The model's configuration is missing, invalid or unsupported.
    #[error(transparent)]
    Model(#[from] rabbit_models::ModelError),
    /// A libtorch operation failed (out of memory, unsupported op on this device, ...).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The caller asked for something invalid (bad option, bad token id, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// The requested device does not exist on this machine.
    #[error("{0}")]
    Device(String),
    /// The prompt plus the tokens to generate exceed what the model or memory allows.
    #[error("context too long: {reason}")]
    ContextTooLong {
        /// Which limit is exceeded, with numbers.
        reason: String,
    },
    /// A split's tensors do not match what the config describes.
    #[error("{file}: tensor `{tensor}`: {reason}")]
    BadTensor {
        /// The unit file.
        file: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Expected vs found.
        reason: String,
    },
    /// A weight file was modified while the model was running (its size or modification time
    /// changed since it was opened): its bytes can no longer be trusted to match what was
    /// checked at open.
    #[error(
        "{}: the file changed while the model was running (size or modification time differ \
         from when it was opened); reload the model",
        path.display()
    )]
    SourceChanged {
        /// The file.
        path: PathBuf,
    },
    /// The background reader thread died.
    #[error("layer reader stopped: {0}")]
    Reader(String),
    /// The model produced NaN or infinite logits (NaN weights, a degenerate checkpoint): no
    /// token can be chosen.
    #[error(
        "non-finite logits at step {step} of sequence {sequence}: token {token} has logit {value} \
         (no token was chosen: the weights or config produce NaN/inf, or the compute dtype \
         overflows — f16 on a bf16 checkpoint does; try --dtype bf16 or f32)"
    )]
    NonFiniteLogits {
        /// Generation step (0: the logits at the end of the prompt).
        step: usize,
        /// Index of the sequence in the request.
        sequence: usize,
        /// The first offending token id.
        token: usize,
        /// Its logit.
        value: f32,
    },
    /// The sampling settings turned finite logits into scores no token can be drawn from.
    #[error("step {step} of sequence {sequence}: {source}")]
    DegenerateScores {
        /// Generation step.
        step: usize,
        /// Index of the sequence in the request.
        sequence: usize,
        /// What went wrong.
        #[source]
        source: crate::sampling::DegenerateScores,
    },
}

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// A split file that ends before the manifest says it should.
    pub(crate) fn truncated(path: impl Into<PathBuf>) -> Self {
        CoreError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file is shorter than the manifest says (damaged split: run `rabbit split --verify`)",
            ),
        )
    }
}

impl CoreError {
    /// A weight file that ends before it should: a split unit file (shorter than its manifest
    /// says) or, with `original`, a checkpoint shard streamed in place (shorter than its header).
    pub(crate) fn truncated_file(path: impl Into<PathBuf>, original: bool) -> Self {
        if !original {
            return CoreError::truncated(path);
        }
        CoreError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file is shorter than its header says (truncated while the model was running, \
                 or an incomplete download)",
            ),
        )
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, CoreError>;
