//! Architecture registry for rabbitllm: what each supported model family *is* — config parsing,
//! tensor names and shapes, split layout, and the few ways a family differs from the shared
//! Llama-lineage decoder. Pure Rust (no libtorch): the decoder math lives in `rabbit-core`.
//!
//! One file per family (`qwen2.rs`, `qwen3.rs`, `llama.rs`, `mistral.rs`) says only what differs.

pub mod arch;
#[cfg(feature = "chat")]
pub mod chat;
pub mod config;
pub mod error;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;
pub mod registry;
pub mod rope;
pub mod spec;
#[cfg(feature = "synth")]
pub mod synth;
#[doc(hidden)]
pub mod testdata;

pub use arch::{Architecture, Variant};
#[cfg(feature = "chat")]
pub use chat::{load_messages, ChatError, ChatTemplate, Message};
pub use config::{GenerationConfig, HfConfig, TokenIds};
pub use error::{ModelError, Result};
pub use registry::{load_spec, lookup, spec_from_config, supported_architectures};
pub use rope::{RopeScaling, RopeSpec};
pub use spec::{names, ModelSpec};
