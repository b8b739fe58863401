//! The shapes synth can write: model families and presets (`tiny` plus real models' shapes).

use super::SynthError;

/// The model families synth can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Family {
    Qwen2,
    Qwen3,
    Llama,
    Mistral,
}

const FAMILIES: [Family; 4] = [Family::Qwen2, Family::Qwen3, Family::Llama, Family::Mistral];

impl Family {
    pub(super) fn key(self) -> &'static str {
        match self {
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
        }
    }

    pub(super) fn architecture(self) -> &'static str {
        match self {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Family, SynthError> {
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
pub(super) struct Llama3Rope {
    pub(super) factor: f64,
    pub(super) low_freq_factor: f64,
    pub(super) high_freq_factor: f64,
    pub(super) original_max_position_embeddings: usize,
}

/// A model shape. `vocab: None` = the synthetic tokenizer's size rounded up to 64.
#[derive(Debug, Clone, Copy)]
pub(super) struct Preset {
    pub(super) name: &'static str,
    pub(super) family: Option<Family>,
    pub(super) description: &'static str,
    pub(super) hidden: usize,
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: Option<usize>,
    pub(super) intermediate: usize,
    pub(super) vocab: Option<usize>,
    pub(super) tied: Option<bool>,
    pub(super) rope_theta: f64,
    pub(super) llama3_rope: Option<Llama3Rope>,
    pub(super) max_position: usize,
    pub(super) rms_norm_eps: f64,
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

pub(super) fn find_preset(f: Family, name: &str) -> Result<&'static Preset, SynthError> {
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
