//! rabbitllm: run language models far larger than device memory by streaming one decoder layer
//! at a time. This facade re-exports the workspace crates; most users need only [`AutoModel`].
//!
//! ```no_run
//! use rabbitllm::{AutoModel, LoadOptions};
//! let mut model = AutoModel::from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", LoadOptions::default())?;
//! println!("{}", model.generate_text("The capital of France is", 16)?);
//! # Ok::<(), rabbitllm::CoreError>(())
//! ```

pub use rabbit_core as core;
pub use rabbit_core::{
    AutoModel, Control, CoreError, DType, DeviceSpec, GenerateOutput, GenerateRequest, LoadOptions,
    Model, SamplingParams, TokenEvent,
};
pub use rabbit_models as models;
pub use rabbit_split as split;
