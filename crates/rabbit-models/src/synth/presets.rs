//! The shapes synth can write: model families and presets (`tiny` plus real models' shapes).

use crate::registry::families;
use crate::Architecture;

use super::moe_presets::MOE_PRESETS;
use super::SynthError;

/// A family synth can write: a registered architecture with a synthetic config.
#[derive(Clone, Copy)]
pub(super) struct Family(pub(super) &'static dyn Architecture);

impl PartialEq for Family {
    fn eq(&self, other: &Family) -> bool {
        self.key() == other.key()
    }
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

impl Family {
    pub(super) fn key(self) -> &'static str {
        self.0.key()
    }

    pub(super) fn architecture(self) -> &'static str {
        self.0.name()
    }

    /// The families of the registry that synth writes.
    fn all() -> Vec<Family> {
        families()
            .iter()
            .filter(|a| a.can_synth())
            .map(|a| Family(*a))
            .collect()
    }

    pub(super) fn parse(s: &str) -> Result<Family, SynthError> {
        let l = s.trim().to_ascii_lowercase();
        let l = match l.as_str() {
            "qwen2.5" => "qwen2",
            "phi-2" | "phi2" => "phi",
            "phi-3" | "phi4" | "phi-4" => "phi3",
            other => other,
        };
        let all = Family::all();
        all.iter()
            .copied()
            .find(|f| l == f.key() || l == f.architecture().to_ascii_lowercase())
            .ok_or_else(|| SynthError::UnknownArch {
                arch: s.to_string(),
                valid: all
                    .iter()
                    .map(|f| format!("{} ({})", f.key(), f.architecture()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// A model shape. `vocab: None` = the synthetic tokenizer's size rounded up to 64.
#[derive(Debug, Clone, Copy)]
pub(super) struct Preset {
    pub(super) name: &'static str,
    /// Family key (`qwen2`, ...); `None` for `tiny`.
    pub(super) family: Option<&'static str>,
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
    /// config.json keys of the real model that differ from its family's synthetic defaults
    /// (a JSON object).
    pub(super) extra: &'static str,
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
    tied: None, // the family's default
    rope_theta: 10_000.0,
    extra: "{}",
    max_position: 2048,
    rms_norm_eps: 1e-6,
};

/// Real shapes, from the models' HF config.json files.
const REAL_PRESETS: &[Preset] = &[
    Preset {
        name: "qwen2.5-0.5b",
        family: Some("qwen2"),
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
        extra: "{}",
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen2.5-1.5b",
        family: Some("qwen2"),
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
        extra: "{}",
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen2.5-3b",
        family: Some("qwen2"),
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
        extra: "{}",
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen2.5-7b",
        family: Some("qwen2"),
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
        extra: "{}",
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen3-0.6b",
        family: Some("qwen3"),
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
        extra: "{}",
        max_position: 40_960,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen3-1.7b",
        family: Some("qwen3"),
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
        extra: "{}",
        max_position: 40_960,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "llama3.2-1b",
        family: Some("llama"),
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
        extra: r#"{"rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#,
        max_position: 131_072,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "mistral-7b",
        family: Some("mistral"),
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
        extra: "{}",
        max_position: 32_768,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "gemma2-2b",
        family: Some("gemma2"),
        description: "Gemma-2-2B shape (soft-capping, window 4096 on alternate layers)",
        hidden: 2304,
        layers: 26,
        heads: 8,
        kv_heads: 4,
        head_dim: Some(256),
        intermediate: 9216,
        vocab: Some(256_000),
        tied: Some(true),
        rope_theta: 10_000.0,
        extra: "{}",
        max_position: 8192,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "gemma3-1b",
        family: Some("gemma3"),
        description: "Gemma-3-1B shape (5 local layers of window 512 per global one)",
        hidden: 1152,
        layers: 26,
        heads: 4,
        kv_heads: 1,
        head_dim: Some(256),
        intermediate: 6912,
        vocab: Some(262_144),
        tied: Some(true),
        rope_theta: 1_000_000.0,
        extra: r#"{"sliding_window": 512, "rope_scaling": null}"#,
        max_position: 32_768,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "phi3-mini",
        family: Some("phi3"),
        description: "Phi-3-mini-4k shape (fused qkv and gate_up, window 2047)",
        hidden: 3072,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        head_dim: None,
        intermediate: 8192,
        vocab: Some(32_064),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: r#"{"sliding_window": 2047, "original_max_position_embeddings": 4096}"#,
        max_position: 4096,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "phi-2",
        family: Some("phi"),
        description:
            "Phi-2 shape (parallel attention and MLP, LayerNorm, rotary on 40% of each head)",
        hidden: 2560,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        head_dim: None,
        intermediate: 10_240,
        vocab: Some(51_200),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: "{}",
        max_position: 2048,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "glm4-9b",
        family: Some("glm4"),
        description:
            "GLM-4-9B-0414 shape (sandwich norms, interleaved rotary on half of each head)",
        hidden: 4096,
        layers: 40,
        heads: 32,
        kv_heads: 2,
        head_dim: Some(128),
        intermediate: 13_696,
        vocab: Some(151_552),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: "{}",
        max_position: 32_768,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "glm-4-9b",
        family: Some("glm"),
        description: "glm-4-9b-chat-hf shape",
        hidden: 4096,
        layers: 40,
        heads: 32,
        kv_heads: 2,
        head_dim: Some(128),
        intermediate: 13_696,
        vocab: Some(151_552),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: "{}",
        max_position: 131_072,
        rms_norm_eps: 1.5625e-07,
    },
    Preset {
        name: "chatglm3-6b",
        family: Some("chatglm"),
        description: "ChatGLM3-6B shape (2 multi-query groups, fused query_key_value, half-head interleaved rotary)",
        hidden: 4096,
        layers: 28,
        heads: 32,
        kv_heads: 2,
        head_dim: Some(128),
        intermediate: 13_696,
        vocab: Some(65_024),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: r#"{}"#,
        max_position: 8192,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "internlm2-7b",
        family: Some("internlm2"),
        description: "InternLM2-7B shape (wqkv packed per key/value group)",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: None,
        intermediate: 14_336,
        vocab: Some(92_544),
        tied: Some(false),
        rope_theta: 1_000_000.0,
        extra: r#"{}"#,
        max_position: 32_768,
        rms_norm_eps: 1e-5,
    },
    Preset {
        name: "internlm-7b",
        family: Some("internlm"),
        description: "InternLM-7B (v1) shape (biases on q/k/v/o)",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        head_dim: None,
        intermediate: 11_008,
        vocab: Some(103_168),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: r#"{}"#,
        max_position: 2048,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "baichuan2-7b",
        family: Some("baichuan"),
        description: "Baichuan2-7B shape (W_pack, NormHead, rotary)",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        head_dim: None,
        intermediate: 11_008,
        vocab: Some(125_696),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: r#"{}"#,
        max_position: 4096,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "baichuan2-13b",
        family: Some("baichuan"),
        description: "Baichuan2-13B shape (W_pack, NormHead, ALiBi)",
        hidden: 5120,
        layers: 40,
        heads: 40,
        kv_heads: 40,
        head_dim: None,
        intermediate: 13_696,
        vocab: Some(125_696),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: r#"{"model_max_length": 4096, "max_position_embeddings": null}"#,
        max_position: 4096,
        rms_norm_eps: 1e-6,
    },
    Preset {
        name: "qwen-7b",
        family: Some("qwen1"),
        description: "Qwen-7B (v1) shape (c_attn, dynamic NTK and log-n past seq_length 8192)",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        head_dim: Some(128),
        intermediate: 11_008,
        vocab: Some(151_936),
        tied: Some(false),
        rope_theta: 10_000.0,
        extra: r#"{"seq_length": 8192}"#,
        max_position: 32_768,
        rms_norm_eps: 1e-6,
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
        .chain(MOE_PRESETS)
        .map(|p| PresetInfo {
            name: p.name,
            arch: p.family.unwrap_or("any"),
            description: p.description,
        })
        .collect()
}

fn family_presets(f: Family) -> Vec<&'static str> {
    std::iter::once(TINY.name)
        .chain(
            REAL_PRESETS
                .iter()
                .chain(MOE_PRESETS)
                .filter(|p| p.family == Some(f.key()))
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
    match REAL_PRESETS.iter().chain(MOE_PRESETS).find(|p| p.name == l) {
        Some(p) if p.family == Some(f.key()) => Ok(p),
        Some(p) => Err(SynthError::PresetOfOtherArch {
            preset: name.to_string(),
            preset_arch: p.family.unwrap_or("any").to_string(),
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
