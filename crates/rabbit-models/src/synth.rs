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
//!   a tiny model's logits have a std of about 2 and greedy decoding is not degenerate.
//! * The tokenizer is a real byte-level BPE (Qwen2's pipeline) learnt from an embedded corpus.
//! * Every file is written atomically and `config.json` comes last: a directory with a
//!   `config.json` is complete. A `rabbit_synth.json` stamp records the options, so asking again
//!   for the same checkpoint is answered from disk, and only our own output is ever overwritten.

pub mod tokenizer;
pub mod weights;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rabbit_split::{Dtype, SplitError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{GenerationConfig, HfConfig};
use crate::error::ModelError;
use crate::registry::spec_from_config;
use crate::spec::ModelSpec;

pub use tokenizer::{synthetic_tokenizer, SynthTokenizer};

/// Name of the stamp file recording the options a directory was generated with.
pub const STAMP_FILE: &str = "rabbit_synth.json";
/// Version of the generator's output; a stamp of another version is never reused.
pub const FORMAT_VERSION: u32 = 1;
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

/// The model families synth can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    Qwen2,
    Qwen3,
    Llama,
    Mistral,
}

const FAMILIES: [Family; 4] = [Family::Qwen2, Family::Qwen3, Family::Llama, Family::Mistral];

impl Family {
    fn key(self) -> &'static str {
        match self {
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
        }
    }

    fn parse(s: &str) -> Result<Family, SynthError> {
        let l = s.trim().to_ascii_lowercase();
        FAMILIES
            .into_iter()
            .find(|f| l == f.key() || l == f.architecture().to_ascii_lowercase())
            .or(match l.as_str() {
                "qwen2.5" => Some(Family::Qwen2),
                _ => None,
            })
            .ok_or_else(|| SynthError::UnknownArch {
                arch: s.to_string(),
                valid: FAMILIES
                    .iter()
                    .map(|f| format!("{} ({})", f.key(), f.architecture()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Llama 3 rope scaling parameters.
#[derive(Debug, Clone, Copy)]
struct Llama3Rope {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: usize,
}

/// A model shape. `vocab: None` = the synthetic tokenizer's size rounded up to 64.
#[derive(Debug, Clone, Copy)]
struct Preset {
    name: &'static str,
    family: Option<Family>,
    description: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: Option<usize>,
    intermediate: usize,
    vocab: Option<usize>,
    tied: Option<bool>,
    rope_theta: f64,
    llama3_rope: Option<Llama3Rope>,
    max_position: usize,
    rms_norm_eps: f64,
}

const TINY: Preset = Preset {
    name: "tiny",
    family: None,
    description: "test-sized model (hidden 64, 2 layers, 4 heads / 2 kv heads), any family",
    hidden: 64,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    head_dim: None,
    intermediate: 128,
    vocab: None,
    tied: None, // tied except for mistral (whose real models are untied)
    rope_theta: 10_000.0,
    llama3_rope: None,
    max_position: 2048,
    rms_norm_eps: 1e-6,
};

/// Real shapes, from the models' HF config.json files.
const REAL_PRESETS: &[Preset] = &[
    Preset {
        name: "qwen2.5-0.5b",
        family: Some(Family::Qwen2),
        description: "Qwen2.5-0.5B shape",
        hidden: 896,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        head_dim: None,
        intermediate: 4864,
        vocab: Some(151_936),
        tied: Some(true),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen2.5-1.5b",
        family: Some(Family::Qwen2),
        description: "Qwen2.5-1.5B shape",
        hidden: 1536,
        layers: 28,
        heads: 12,
        kv_heads: 2,
        head_dim: None,
        intermediate: 8960,
        vocab: Some(151_936),
        tied: Some(true),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen2.5-3b",
        family: Some(Family::Qwen2),
        description: "Qwen2.5-3B shape",
        hidden: 2048,
        layers: 36,
        heads: 16,
        kv_heads: 2,
        head_dim: None,
        intermediate: 11_008,
        vocab: Some(151_936),
        tied: Some(true),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen2.5-7b",
        family: Some(Family::Qwen2),
        description: "Qwen2.5-7B shape (untied LM head)",
        hidden: 3584,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        head_dim: None,
        intermediate: 18_944,
        vocab: Some(152_064),
        tied: Some(false),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen3-0.6b",
        family: Some(Family::Qwen3),
        description: "Qwen3-0.6B shape",
        hidden: 1024,
        layers: 28,
        heads: 16,
        kv_heads: 8,
        head_dim: Some(128),
        intermediate: 3072,
        vocab: Some(151_936),
        tied: Some(true),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 40_960,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen3-1.7b",
        family: Some(Family::Qwen3),
        description: "Qwen3-1.7B shape",
        hidden: 2048,
        layers: 28,
        heads: 16,
        kv_heads: 8,
        head_dim: Some(128),
        intermediate: 6144,
        vocab: Some(151_936),
        tied: Some(true),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 40_960,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "llama3.2-1b",
        family: Some(Family::Llama),
        description: "Llama-3.2-1B shape (llama3 rope scaling)",
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: Some(64),
        intermediate: 8192,
        vocab: Some(128_256),
        tied: Some(true),
        rope_theta: 500_000.0,
        llama3_rope: Some(Llama3Rope {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }),
        max_position: 131_072,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "mistral-7b",
        family: Some(Family::Mistral),
        description: "Mistral-7B-Instruct-v0.2 shape (rope 1e6, no sliding window, untied)",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: None,
        intermediate: 14_336,
        vocab: Some(32_000),
        tied: Some(false),
        rope_theta: 1_000_000.0,
        llama3_rope: None,
        max_position: 32_768,
        rms_norm_eps: 1e-5,
    },
];

/// A preset as listed to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresetInfo {
    /// Preset name (`--preset`).
    pub name: &'static str,
    /// Family key (`qwen2`, ...), or `any` for `tiny`.
    pub arch: &'static str,
    /// One line about it.
    pub description: &'static str,
}

/// Every preset, `tiny` first.
pub fn all_presets() -> Vec<PresetInfo> {
    std::iter::once(&TINY)
        .chain(REAL_PRESETS)
        .map(|p| PresetInfo {
            name: p.name,
            arch: p.family.map_or("any", Family::key),
            description: p.description,
        })
        .collect()
}

fn family_presets(f: Family) -> Vec<&'static str> {
    std::iter::once(TINY.name)
        .chain(
            REAL_PRESETS
                .iter()
                .filter(|p| p.family == Some(f))
                .map(|p| p.name),
        )
        .collect()
}

/// Names of the presets usable with `arch`.
pub fn presets(arch: &str) -> Result<Vec<&'static str>, SynthError> {
    Ok(family_presets(Family::parse(arch)?))
}

fn find_preset(f: Family, name: &str) -> Result<&'static Preset, SynthError> {
    let l = name.trim().to_ascii_lowercase();
    let valid = || family_presets(f).join(", ");
    if l == TINY.name {
        return Ok(&TINY);
    }
    match REAL_PRESETS.iter().find(|p| p.name == l) {
        Some(p) if p.family == Some(f) => Ok(p),
        Some(p) => Err(SynthError::PresetOfOtherArch {
            preset: name.to_string(),
            preset_arch: p.family.map_or("any", Family::key).to_string(),
            arch: f.key().to_string(),
            valid: valid(),
        }),
        None => Err(SynthError::UnknownPreset {
            preset: name.to_string(),
            arch: f.key().to_string(),
            valid: valid(),
        }),
    }
}

/// The options that determine a checkpoint's content, as stored in the stamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StampOptions {
    arch: String,
    preset: String,
    shards: usize,
    dtype: SynthDtype,
    seed: u64,
    overrides: SynthOverrides,
}

/// `rabbit_synth.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stamp {
    generator: String,
    format: u32,
    options: StampOptions,
    /// False while generating; true once every file but config.json is in place.
    complete: bool,
    /// File name -> size, for a cheap completeness check before reuse.
    files: BTreeMap<String, u64>,
}

const GENERATOR: &str = "rabbitllm synth";

/// A fully validated synthesis job: what will be written, before anything is.
#[derive(Debug, Clone)]
pub struct SynthPlan {
    /// The config.json that will be written.
    pub config_json: Value,
    /// The same, parsed.
    pub config: HfConfig,
    /// The generation_config.json that will be written.
    pub generation_config_json: Value,
    /// The resolved model.
    pub spec: ModelSpec,
    /// Parameters (embedding counted once when tied).
    pub num_parameters: u64,
    /// Bytes of tensor data.
    pub weight_bytes: u64,
    /// Weight file names.
    pub weight_files: Vec<String>,
    /// Tokens of the synthetic tokenizer.
    pub tokenizer_size: usize,
    shards: Vec<weights::ShardPlan>,
    stamp: StampOptions,
    dtype: SynthDtype,
    seed: u64,
}

fn tokenizer() -> Result<&'static SynthTokenizer, SynthError> {
    synthetic_tokenizer().map_err(|reason| SynthError::Tokenizer { reason })
}

fn overrides_cli(o: &SynthOverrides) -> String {
    let mut s = String::new();
    let mut add = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            s.push_str(&format!(" --{flag} {v}"));
        }
    };
    add("layers", o.layers.map(|v| v.to_string()));
    add("hidden", o.hidden.map(|v| v.to_string()));
    add("intermediate", o.intermediate.map(|v| v.to_string()));
    add("heads", o.heads.map(|v| v.to_string()));
    add("kv-heads", o.kv_heads.map(|v| v.to_string()));
    add("head-dim", o.head_dim.map(|v| v.to_string()));
    add("vocab", o.vocab.map(|v| v.to_string()));
    add("max-position", o.max_position.map(|v| v.to_string()));
    add(
        "tie-word-embeddings",
        o.tie_word_embeddings.map(|v| v.to_string()),
    );
    add("rope-theta", o.rope_theta.map(|v| v.to_string()));
    s
}

/// Validates the options and computes everything that will be written (nothing touches disk).
pub fn plan(opts: &SynthOptions) -> Result<SynthPlan, SynthError> {
    let family = Family::parse(&opts.arch)?;
    let p = find_preset(family, &opts.preset)?;
    let o = &opts.overrides;
    let tok = tokenizer()?;
    if opts.shards == 0 {
        return Err(SynthError::InvalidOption {
            option: "--shards",
            reason: "must be at least 1".into(),
        });
    }

    let hidden = o.hidden.unwrap_or(p.hidden);
    let layers = o.layers.unwrap_or(p.layers);
    let heads = o.heads.unwrap_or(p.heads);
    let kv_heads = o.kv_heads.unwrap_or(p.kv_heads);
    let intermediate = o.intermediate.unwrap_or(p.intermediate);
    let max_position = o.max_position.unwrap_or(p.max_position);
    let tied = o
        .tie_word_embeddings
        .or(p.tied)
        .unwrap_or(family != Family::Mistral);
    let rope_theta = o.rope_theta.unwrap_or(p.rope_theta);
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(SynthError::InvalidOption {
            option: "--rope-theta",
            reason: format!("must be a positive number, got {rope_theta}"),
        });
    }
    let min_vocab = tok.len();
    let vocab = o
        .vocab
        .or(p.vocab)
        .unwrap_or(min_vocab.next_multiple_of(64));
    if vocab < min_vocab {
        return Err(SynthError::InvalidOption {
            option: "--vocab",
            reason: format!(
                "{vocab} is smaller than the synthetic tokenizer, which has {min_vocab} tokens"
            ),
        });
    }
    let divisible = hidden.checked_rem(heads) == Some(0);
    let head_dim = match (o.head_dim.or(p.head_dim), family) {
        (Some(d), _) => Some(d),
        (None, Family::Qwen3) if divisible => Some(hidden / heads),
        (None, Family::Qwen3) => {
            return Err(SynthError::InvalidOption {
                option: "--head-dim",
                reason: format!(
                    "qwen3 needs a head_dim: hidden size {hidden} is not divisible by {heads} heads"
                ),
            })
        }
        // Llama configs carry head_dim (hidden / heads); Qwen2 and Mistral ones do not.
        (None, Family::Llama) if divisible => Some(hidden / heads),
        (None, _) => None,
    };

    let endoftext = tok.endoftext_id();
    let im_end = tok.im_end_id();
    let mut cfg = serde_json::Map::new();
    let mut set = |k: &str, v: Value| {
        cfg.insert(k.to_string(), v);
    };
    set("architectures", json!([family.architecture()]));
    set("attention_dropout", json!(0.0));
    set("bos_token_id", json!(endoftext));
    set("eos_token_id", json!(im_end));
    set("hidden_act", json!("silu"));
    set("hidden_size", json!(hidden));
    set("initializer_range", json!(0.02));
    set("intermediate_size", json!(intermediate));
    set("max_position_embeddings", json!(max_position));
    set("model_type", json!(family.key()));
    set("num_attention_heads", json!(heads));
    set("num_hidden_layers", json!(layers));
    set("num_key_value_heads", json!(kv_heads));
    set("rms_norm_eps", json!(p.rms_norm_eps));
    set("rope_theta", json!(rope_theta));
    set(
        "rope_scaling",
        match p.llama3_rope {
            Some(r) => json!({
                "factor": r.factor,
                "high_freq_factor": r.high_freq_factor,
                "low_freq_factor": r.low_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "rope_type": "llama3"
            }),
            None => Value::Null,
        },
    );
    set("tie_word_embeddings", json!(tied));
    set("torch_dtype", json!(opts.dtype.torch_name()));
    set("transformers_version", json!(TRANSFORMERS_VERSION));
    set("use_cache", json!(true));
    set("vocab_size", json!(vocab));
    if let Some(d) = head_dim {
        set("head_dim", json!(d));
    }
    match family {
        Family::Qwen2 | Family::Qwen3 => {
            set("max_window_layers", json!(layers));
            set("sliding_window", Value::Null);
            set("use_sliding_window", json!(false));
            if family == Family::Qwen3 {
                set("attention_bias", json!(false));
            }
        }
        Family::Llama => {
            set("attention_bias", json!(false));
            set("mlp_bias", json!(false));
            set("pretraining_tp", json!(1));
        }
        Family::Mistral => {
            set("sliding_window", Value::Null);
        }
    }
    let config_json = Value::Object(cfg);
    let generation_config_json = json!({
        "bos_token_id": endoftext,
        "do_sample": false,
        "eos_token_id": [endoftext, im_end],
        "pad_token_id": endoftext,
        "transformers_version": TRANSFORMERS_VERSION
    });

    let stamp = StampOptions {
        arch: family.key().to_string(),
        preset: p.name.to_string(),
        shards: opts.shards,
        dtype: opts.dtype,
        seed: opts.seed,
        overrides: o.clone(),
    };
    let invalid = |source: ModelError| SynthError::InvalidConfig {
        request: format!(
            "--arch {} --preset {}{}",
            family.key(),
            p.name,
            overrides_cli(o)
        ),
        source: Box::new(source),
    };
    let config: HfConfig = serde_json::from_value(config_json.clone()).map_err(|e| {
        invalid(ModelError::BadConfig {
            path: "config.json".into(),
            reason: e.to_string(),
        })
    })?;
    let gen: GenerationConfig =
        serde_json::from_value(generation_config_json.clone()).map_err(|e| {
            invalid(ModelError::BadConfig {
                path: "generation_config.json".into(),
                reason: e.to_string(),
            })
        })?;
    let spec = spec_from_config(&config, Some(&gen)).map_err(invalid)?;

    let tensors = spec.tensor_shapes();
    if opts.shards > tensors.len() {
        return Err(SynthError::InvalidOption {
            option: "--shards",
            reason: format!(
                "{} shards requested but the model has only {} tensors",
                opts.shards,
                tensors.len()
            ),
        });
    }
    let shards = weights::plan_shards(&tensors, opts.dtype.size_bytes(), opts.shards);
    Ok(SynthPlan {
        num_parameters: spec.num_parameters(),
        weight_bytes: shards.iter().map(|s| s.data_bytes).sum(),
        weight_files: shards.iter().map(|s| s.file_name.clone()).collect(),
        tokenizer_size: tok.len(),
        config_json,
        config,
        generation_config_json,
        spec,
        shards,
        stamp,
        dtype: opts.dtype,
        seed: opts.seed,
    })
}

/// Whether a directory entry is a file `rabbit synth` writes (or its temporary).
fn is_our_file(name: &str) -> bool {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    const FIXED: &[&str] = &[
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
        "model.safetensors.index.json",
        STAMP_FILE,
    ];
    if FIXED.contains(&base) {
        return true;
    }
    // model-00001-of-00003.safetensors
    base.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
        })
}

/// Writes a small file atomically (`<name>.tmp`, fsync, rename); returns its size.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<u64, SynthError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let res = (|| {
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map(|()| bytes.len() as u64)
}

fn sync_dir(dir: &Path) -> Result<(), SynthError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON value serializes");
    s.push('\n');
    s.into_bytes()
}

fn read_stamp(dir: &Path) -> Option<Box<Stamp>> {
    let text = fs::read_to_string(dir.join(STAMP_FILE)).ok()?;
    serde_json::from_str(&text).ok().map(Box::new)
}

/// The state of the output directory before writing.
enum DirState {
    /// Missing or empty.
    Fresh,
    /// Our own earlier output (complete or not), with its stamp if readable.
    Ours(Option<Box<Stamp>>),
}

fn inspect_dir(dir: &Path) -> Result<DirState, SynthError> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            return Ok(DirState::Fresh);
        }
        Err(e) => return Err(io_err(dir)(e)),
        Ok(m) if !m.is_dir() => {
            return Err(SynthError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if names.is_empty() {
        return Ok(DirState::Fresh);
    }
    if names.iter().any(|n| n == STAMP_FILE) {
        return Ok(DirState::Ours(read_stamp(dir)));
    }
    names.sort();
    let mut found = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        found.push_str(&format!(" and {} more", names.len() - 5));
    }
    Err(SynthError::ForeignDirectory {
        dir: dir.to_path_buf(),
        found,
    })
}

/// True when `stamp` describes a finished checkpoint of exactly these options, still on disk.
fn reusable(dir: &Path, stamp: &Stamp, want: &StampOptions) -> bool {
    stamp.generator == GENERATOR
        && stamp.format == FORMAT_VERSION
        && stamp.complete
        && stamp.options == *want
        && dir.join("config.json").is_file()
        && stamp.files.iter().all(|(name, size)| {
            fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == *size)
        })
}

/// Writes the checkpoint described by `opts` (see the module docs). `progress` is called with
/// [`SynthProgress`] events as work advances.
pub fn synthesize(
    opts: &SynthOptions,
    progress: &mut dyn FnMut(SynthProgress),
) -> Result<SynthReport, SynthError> {
    let plan = plan(opts)?;
    let dir = opts.out_dir.as_path();
    let state = inspect_dir(dir)?;
    let report =
        |files: Vec<PathBuf>, bytes_written: u64, total_bytes: u64, reused: bool| SynthReport {
            out_dir: dir.to_path_buf(),
            config: plan.config.clone(),
            spec: plan.spec.clone(),
            num_parameters: plan.num_parameters,
            bytes_written,
            total_bytes,
            files,
            reused,
            tokenizer_size: plan.tokenizer_size,
        };

    if let DirState::Ours(Some(stamp)) = &state {
        if reusable(dir, stamp, &plan.stamp) {
            progress(SynthProgress::Reused);
            let mut files: Vec<PathBuf> = stamp.files.keys().map(|n| dir.join(n)).collect();
            files.push(dir.join("config.json"));
            let total = stamp.files.values().sum::<u64>()
                + fs::metadata(dir.join("config.json")).map_or(0, |m| m.len());
            return Ok(report(files, 0, total, true));
        }
    }
    if let DirState::Ours(_) = state {
        // Mark the directory incomplete first, then clear the rest of our old output.
        let cfg = dir.join("config.json");
        match fs::remove_file(&cfg) {
            Ok(()) => sync_dir(dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&cfg)(e)),
        }
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != STAMP_FILE && is_our_file(&name) {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
    }

    let tok = tokenizer()?;
    let mut stamp = Stamp {
        generator: GENERATOR.to_string(),
        format: FORMAT_VERSION,
        options: plan.stamp.clone(),
        complete: false,
        files: BTreeMap::new(),
    };
    write_atomic(
        &dir.join(STAMP_FILE),
        &pretty(&serde_json::to_value(&stamp).expect("stamp")),
    )?;
    sync_dir(dir)?;
    progress(SynthProgress::Started {
        num_parameters: plan.num_parameters,
        weight_bytes: plan.weight_bytes,
        weight_files: plan.shards.len(),
    });

    let mut written = 0u64;
    let mut files = Vec::new();
    let mut record =
        |name: &str, bytes: u64, stamp: &mut Stamp, progress: &mut dyn FnMut(SynthProgress)| {
            let path = dir.join(name);
            stamp.files.insert(name.to_string(), bytes);
            written += bytes;
            files.push(path.clone());
            progress(SynthProgress::FileWritten { path, bytes });
        };
    let model_max_length = plan.config.max_position_embeddings;
    let small: [(&str, Vec<u8>); 5] = [
        ("tokenizer.json", tok.tokenizer_json().into_bytes()),
        (
            "tokenizer_config.json",
            pretty(&tok.tokenizer_config_json(model_max_length)),
        ),
        ("vocab.json", tok.vocab_json().into_bytes()),
        ("merges.txt", tok.merges_txt().into_bytes()),
        (
            "generation_config.json",
            pretty(&plan.generation_config_json),
        ),
    ];
    for (name, bytes) in small {
        let n = write_atomic(&dir.join(name), &bytes)?;
        record(name, n, &mut stamp, progress);
    }

    let total = plan.weight_bytes;
    let mut done = 0u64;
    let hidden = plan.spec.hidden_size;
    let threads = weights::default_threads();
    let mut weight_map = BTreeMap::new();
    for shard in &plan.shards {
        let written_file = weights::write_shard(
            dir,
            shard,
            weights::WeightGen {
                dtype: plan.dtype.safetensors(),
                seed: plan.seed,
                hidden,
                live_rows: plan.tokenizer_size,
            },
            threads,
            &mut |n| {
                done += n;
                progress(SynthProgress::Weights { done, total });
            },
        )?;
        record(&shard.file_name, written_file.size, &mut stamp, progress);
        for (name, _) in &shard.tensors {
            weight_map.insert(name.clone(), shard.file_name.clone());
        }
    }
    if plan.shards.len() > 1 {
        let index = json!({
            "metadata": {"total_size": plan.weight_bytes},
            "weight_map": weight_map,
        });
        let name = "model.safetensors.index.json";
        let n = write_atomic(&dir.join(name), &pretty(&index))?;
        record(name, n, &mut stamp, progress);
    }

    stamp.complete = true;
    let stamp_bytes = pretty(&serde_json::to_value(&stamp).expect("stamp"));
    write_atomic(&dir.join(STAMP_FILE), &stamp_bytes)?;
    sync_dir(dir)?;
    // config.json last: its presence means the checkpoint is complete.
    let n = write_atomic(&dir.join("config.json"), &pretty(&plan.config_json))?;
    sync_dir(dir)?;
    record("config.json", n, &mut stamp, progress);
    let total_bytes = written;
    Ok(report(files, written, total_bytes, false))
}
