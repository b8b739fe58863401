//! Synthetic checkpoints: a complete Hugging Face model directory (config.json,
//! generation_config.json, tokenizer files, safetensors weights) with seeded random weights, in the
//! exact tensor layout of a supported family and the exact shape of a real model (or a tiny one
//! for tests).
//!
//! * Shapes come from a preset (`tiny`, `qwen2.5-0.5b`, ...) plus [`SynthOverrides`]; the result is
//!   validated by resolving it through [`crate::registry::spec_from_config`] before anything is
//!   written, and the tensors written are exactly [`ModelSpec::tensor_shapes`].
//! * Weights are streamed: each tensor is generated in chunks of [`weights::CHUNK_ELEMS`]
//!   elements (by a few threads) straight into the safetensors writer, so memory use does not
//!   grow with the model. Same options and seed ⇒ byte-identical files. Scales: linear weights
//!   `1/sqrt(fan_in)`, embeddings `0.5/sqrt(hidden)`, RMSNorm gains `1 ± 0.02` (final norm 4), so
//!   a tiny model's logits have a std of about 2 and greedy decoding is not degenerate. A family
//!   that scales its embeddings (Gemma) gets them that much smaller and its final norm that much
//!   larger; `1 + w` norms are stored centred on 0. An untied LM head has zero rows for the
//!   special tokens, so a random model runs to its length instead of ending its turn by chance.
//! * The tokenizer is a real byte-level BPE (Qwen2's pipeline) learnt from an embedded corpus.
//! * Every file is written atomically and `config.json` comes last: a directory with a
//!   `config.json` is complete. A `rabbit_synth.json` stamp records the options, so asking again
//!   for the same checkpoint is answered from disk, and only our own output is ever overwritten.

pub mod init;
pub mod like;
pub mod tokenizer;
pub mod weights;

mod moe_presets;
mod plan;
mod presets;
mod stamp;
mod write;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rabbit_split::{Dtype, SplitError};
use serde::{Deserialize, Serialize};

use crate::config::HfConfig;
use crate::error::ModelError;
use crate::spec::ModelSpec;

pub use like::{derive_like, LikeOptions, LikeReport};
pub use plan::{plan, SynthPlan};
pub use presets::{all_presets, presets, PresetInfo};
pub use tokenizer::{synthetic_tokenizer, SynthTokenizer};
pub use write::synthesize;

/// Name of the stamp file recording the options a directory was generated with.
pub const STAMP_FILE: &str = "rabbit_synth.json";
/// Version of the generator's output; a stamp of another version is never reused.
pub const FORMAT_VERSION: u32 = 2;
/// Written as `transformers_version` (4.51 is the first release with Qwen3).
pub const TRANSFORMERS_VERSION: &str = "4.51.3";

/// Storage dtype of the synthetic weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthDtype {
    /// float32.
    F32,
    /// bfloat16 (the default, like the real checkpoints).
    #[default]
    BF16,
    /// float16.
    F16,
}

impl SynthDtype {
    /// The safetensors dtype.
    pub fn safetensors(self) -> Dtype {
        match self {
            SynthDtype::F32 => Dtype::F32,
            SynthDtype::BF16 => Dtype::BF16,
            SynthDtype::F16 => Dtype::F16,
        }
    }

    /// config.json's `torch_dtype` value.
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDtype::F32 => "float32",
            SynthDtype::BF16 => "bfloat16",
            SynthDtype::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        self.safetensors().size_bytes() as u64
    }
}

impl fmt::Display for SynthDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SynthDtype::F32 => "f32",
            SynthDtype::BF16 => "bf16",
            SynthDtype::F16 => "f16",
        })
    }
}

/// Error of [`SynthDtype::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}` (expected f32, bf16 or f16)")]
pub struct UnknownSynthDtype(pub String);

impl FromStr for SynthDtype {
    type Err = UnknownSynthDtype;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(SynthDtype::F32),
            "bf16" | "bfloat16" => Ok(SynthDtype::BF16),
            "f16" | "float16" | "fp16" => Ok(SynthDtype::F16),
            _ => Err(UnknownSynthDtype(s.to_string())),
        }
    }
}

/// Changes applied on top of a preset (CLI: `--layers`, `--hidden`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SynthOverrides {
    /// `num_hidden_layers`.
    pub layers: Option<usize>,
    /// `hidden_size`.
    pub hidden: Option<usize>,
    /// `intermediate_size`.
    pub intermediate: Option<usize>,
    /// `num_attention_heads`.
    pub heads: Option<usize>,
    /// `num_key_value_heads`.
    pub kv_heads: Option<usize>,
    /// `head_dim`.
    pub head_dim: Option<usize>,
    /// `vocab_size` (must be at least the synthetic tokenizer's size).
    pub vocab: Option<usize>,
    /// `max_position_embeddings`.
    pub max_position: Option<usize>,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
    /// `rope_theta`.
    pub rope_theta: Option<f64>,
    /// Routed experts per sparse layer (`num_experts` / `num_local_experts`; mixtures of
    /// experts only).
    #[serde(default)]
    pub experts: Option<usize>,
    /// Experts each token is routed to (`num_experts_per_tok`).
    #[serde(default)]
    pub experts_per_token: Option<usize>,
    /// Each expert's MLP width (`moe_intermediate_size`; Mixtral: `intermediate_size`).
    #[serde(default)]
    pub moe_intermediate: Option<usize>,
}

/// What to synthesize and where.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Family: `qwen2`, `qwen3`, `llama`, `mistral` (or `Qwen2ForCausalLM`, ...).
    pub arch: String,
    /// Shape preset (see [`all_presets`]).
    pub preset: String,
    /// Output directory (created if missing; must be empty or our own earlier output).
    pub out_dir: PathBuf,
    /// 1 = one `model.safetensors`; N > 1 = N shards plus `model.safetensors.index.json`.
    pub shards: usize,
    /// Storage dtype.
    pub dtype: SynthDtype,
    /// Seed of the weights.
    pub seed: u64,
    /// Shape changes on top of the preset.
    pub overrides: SynthOverrides,
}

impl SynthOptions {
    /// Options with one shard, bf16, seed 0 and no overrides.
    pub fn new(arch: &str, preset: &str, out_dir: impl Into<PathBuf>) -> Self {
        SynthOptions {
            arch: arch.to_string(),
            preset: preset.to_string(),
            out_dir: out_dir.into(),
            shards: 1,
            dtype: SynthDtype::BF16,
            seed: 0,
            overrides: SynthOverrides::default(),
        }
    }
}

/// Progress of [`synthesize`].
#[derive(Debug, Clone, PartialEq)]
pub enum SynthProgress {
    /// The directory already holds this exact checkpoint; nothing is written.
    Reused,
    /// Generation starts.
    Started {
        /// Parameters of the model.
        num_parameters: u64,
        /// Bytes of tensor data to generate.
        weight_bytes: u64,
        /// Number of safetensors files.
        weight_files: usize,
    },
    /// Tensor data written so far.
    Weights {
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// A file is complete (renamed into place).
    FileWritten {
        /// Its path.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
}

/// What [`synthesize`] produced.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The checkpoint directory.
    pub out_dir: PathBuf,
    /// The config.json written (as parsed back).
    pub config: HfConfig,
    /// The resolved model.
    pub spec: ModelSpec,
    /// Parameters (embedding counted once when tied).
    pub num_parameters: u64,
    /// Bytes written by this call (0 when reused).
    pub bytes_written: u64,
    /// Size of all the checkpoint's files.
    pub total_bytes: u64,
    /// Every file of the checkpoint, config.json last.
    pub files: Vec<PathBuf>,
    /// True when an identical earlier checkpoint was found and kept.
    pub reused: bool,
    /// Tokens of the synthetic tokenizer (special tokens included).
    pub tokenizer_size: usize,
}

/// Everything that can go wrong in [`synthesize`].
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// `--arch` names no supported family.
    #[error("unknown architecture `{arch}` for synth (valid: {valid})")]
    UnknownArch {
        /// What was given.
        arch: String,
        /// The accepted names.
        valid: String,
    },
    /// `--preset` names no preset.
    #[error("unknown preset `{preset}` for {arch} (valid presets for {arch}: {valid})")]
    UnknownPreset {
        /// What was given.
        preset: String,
        /// The family.
        arch: String,
        /// Presets of that family.
        valid: String,
    },
    /// The preset belongs to another family.
    #[error(
        "preset `{preset}` is a {preset_arch} shape and cannot be used with --arch {arch} (valid presets for {arch}: {valid})"
    )]
    PresetOfOtherArch {
        /// What was given.
        preset: String,
        /// The preset's family.
        preset_arch: String,
        /// The requested family.
        arch: String,
        /// Presets of the requested family.
        valid: String,
    },
    /// An option's value cannot work.
    #[error("invalid {option}: {reason}")]
    InvalidOption {
        /// The option (CLI spelling).
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The preset plus overrides do not make a valid model.
    #[error("the configuration for {request} is invalid: {source}")]
    InvalidConfig {
        /// The request, CLI-style (`--arch qwen2 --preset tiny --heads 3`).
        request: String,
        /// What the registry refused.
        #[source]
        source: Box<ModelError>,
    },
    /// The output directory holds files that `rabbit synth` did not write.
    #[error(
        "refusing to write into {}: it is not empty and is not an earlier `rabbit synth` output (found {found}); choose a new or empty directory",
        dir.display()
    )]
    ForeignDirectory {
        /// The directory.
        dir: PathBuf,
        /// Some of its entries.
        found: String,
    },
    /// The output path exists and is not a directory.
    #[error("{} exists and is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Filesystem error.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Error while writing a weight file.
    #[error(transparent)]
    Write(#[from] SplitError),
    /// The synthetic tokenizer could not be built (a bug).
    #[error("building the synthetic tokenizer: {reason}")]
    Tokenizer {
        /// What failed.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}
