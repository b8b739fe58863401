//! Errors of the front end: everything the executor can report, plus what only the front end
//! does (finding or downloading a model, tokenizing text, rendering chat templates).

use std::path::PathBuf;

/// What can go wrong between a model id and generated text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The executor failed (split, config, libtorch, bad request, ...).
    #[error(transparent)]
    Core(#[from] rabbit_core::CoreError),
    /// The model's configuration is missing, invalid or unsupported.
    #[error(transparent)]
    Model(#[from] rabbit_models::ModelError),
    /// Splitting the checkpoint failed.
    #[error(transparent)]
    Split(#[from] rabbit_split::SplitError),
    /// The chat template could not be loaded or rendered.
    #[error("chat template: {0}")]
    Chat(#[from] rabbit_models::chat::ChatError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The caller asked for something invalid.
    #[error("{0}")]
    InvalidInput(String),
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Finding or downloading the model on the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the front end.
pub type Result<T> = std::result::Result<T, Error>;
