//! rabbitllm: run language models far larger than device memory by streaming one decoder layer
//! at a time.
//!
//! This crate is the front end: it finds (or downloads) a checkpoint ([`hub`]), streams it in
//! place or splits it where that pays ([`storage`]), opens the executor ([`rabbit_core::Engine`]) and turns text into token ids and back
//! ([`text`]). Most users need only [`AutoModel`]. The executor itself (`rabbit-core`) builds and
//! runs without network or tokenizer crates.
//!
//! ```no_run
//! use rabbitllm::{AutoModel, LoadOptions};
//! let mut model = AutoModel::from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", LoadOptions::default())?;
//! println!("{}", model.generate_text("The capital of France is", 16)?);
//! # Ok::<(), rabbitllm::Error>(())
//! ```

pub mod chat;
pub mod error;
pub mod hub;
pub mod model;
pub mod options;
pub mod storage;
pub mod text;

pub use error::{Error, Result};
pub use model::{AutoModel, LoadEvent, LoadOptions, Model};
pub use rabbit_core as core;
pub use rabbit_core::{
    Control, CoreError, DType, DeviceSpec, ExpertCacheSize, GenerateOutput, GenerateRequest,
    SamplingParams, Threads, TokenEvent,
};
pub use rabbit_models as models;
pub use rabbit_split as split;
pub use storage::SplitPolicy;
