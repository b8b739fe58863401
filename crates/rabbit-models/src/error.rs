//! Errors of the architecture registry and config resolution.

use std::path::PathBuf;

/// Everything that can go wrong while reading a model's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No config.json where a checkpoint was expected.
    #[error("missing {path}: a model directory needs a config.json")]
    MissingConfig {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// config.json or generation_config.json is not valid for its schema.
    #[error("{path}: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A field's value is outside what the architecture supports or contradicts another field.
    #[error("config.json for {architecture}: {reason}")]
    Unsupported {
        /// `architectures[0]`.
        architecture: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// `architectures[0]` is recognised but not implemented yet.
    #[error(
        "architecture {architecture} is not yet supported by rabbitllm (supported: {supported})"
    )]
    NotYetSupported {
        /// `architectures[0]`.
        architecture: String,
        /// Comma-separated supported names.
        supported: String,
    },
    /// `architectures[0]` is not known at all.
    #[error("unknown architecture `{architecture}` (supported: {supported})")]
    UnknownArchitecture {
        /// `architectures[0]`, or a placeholder when the field is missing.
        architecture: String,
        /// Comma-separated supported names.
        supported: String,
    },
    /// Filesystem error on a config file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
