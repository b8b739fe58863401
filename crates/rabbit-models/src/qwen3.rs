//! Qwen3 (`Qwen3ForCausalLM`): per-head RMSNorm on q and k before RoPE, head_dim defaults to
//! 128 (not hidden/heads), optional attention bias, Qwen-style sliding window.

use serde_json::json;

use crate::arch::{SlidingPolicy, Variant};
use crate::blocks::Activation;
use crate::lineage::{Bias, LlamaLineage};

static VARIANT: Variant = Variant {
    name: "Qwen3ForCausalLM",
    model_type: "qwen3",
    default_head_dim: Some(128),
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::QwenStyle,
    default_max_window_layers: 28,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &["max_window_layers", "use_sliding_window"],
};

/// `Qwen3ForCausalLM`.
pub static QWEN3: LlamaLineage = LlamaLineage {
    variant: &VARIANT,
    key: "qwen3",
    qkv_bias: Bias::AttentionBiasField,
    o_bias: Bias::AttentionBiasField,
    mlp_bias: Bias::Never,
    qk_norm: true,
    synth: |s| {
        json!({"tie_word_embeddings": true, "max_window_layers": s.layers, "sliding_window": null, "use_sliding_window": false,
               "attention_bias": false, "head_dim": s.head_dim})
    },
};
