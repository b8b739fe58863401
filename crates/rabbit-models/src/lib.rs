//! Architecture registry for rabbitllm: what each supported model family *is* — config parsing,
//! tensor names and shapes, split layout, and the few ways a family differs from the shared
//! Llama-lineage decoder. Pure Rust (no libtorch): the decoder math lives in `rabbit-core`.
//!
//! One file per family says what its model is: the Llama lineage (`lineage.rs` with `qwen2.rs`,
//! `qwen3.rs`, `llama.rs`, `mistral.rs`), `gemma.rs`, `phi.rs`, `glm.rs`, and the families whose
//! checkpoints ship their own modeling code (`chatglm.rs`, `internlm.rs`, `baichuan.rs`,
//! `qwen1.rs`), the mixtures of experts (`mixtral.rs`, `qwen_moe.rs`, `deepseek.rs` with its latent
//! attention in `mla.rs`), in the vocabulary of `blocks.rs`.

pub mod arch;
pub mod baichuan;
pub mod blocks;
#[cfg(feature = "chat")]
pub mod chat;
pub mod chatglm;
pub mod config;
pub mod deepseek;
pub mod error;
pub mod gemma;
pub mod glm;
pub mod gpt_oss;
pub mod internlm;
pub mod lineage;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod mla;
pub mod moe;
pub mod phi;
pub mod quant;
pub mod qwen1;
pub mod qwen2;
pub mod qwen3;
pub mod qwen_moe;
pub mod registry;
pub mod resolve;
pub mod rope;
pub mod spec;
#[cfg(feature = "synth")]
pub mod synth;
#[doc(hidden)]
pub mod testdata;
#[cfg(feature = "text")]
pub mod tokenizer;

pub use arch::{Architecture, Variant};
pub use blocks::{
    alibi_slopes, Activation, AttentionSpec, LayerProgram, Norm, NormKind, Param, Role,
    TensorLayout,
};
#[cfg(feature = "chat")]
pub use chat::{load_messages, ChatError, ChatTemplate, Message};
pub use config::{GenerationConfig, HfConfig, TokenIds};
pub use error::{ModelError, Result};
pub use mla::{KvShape, MlaSpec};
pub use moe::{ExpertMlp, MoeSpec, Routing, SharedExpert};
pub use registry::{families, load_spec, lookup, spec_from_config, supported_architectures};
pub use rope::{RopeScaling, RopeSpec};
pub use spec::ModelSpec;
#[cfg(feature = "text")]
pub use tokenizer::{load_tokenizer, LoadedTokenizer, TokenizerError, TokenizerSource};
