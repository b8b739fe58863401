//! Qwen3 (`Qwen3ForCausalLM`): per-head RMSNorm on q and k before RoPE, head_dim defaults to
//! 128 (not hidden/heads), optional attention bias, Qwen-style sliding window.

use crate::arch::{Architecture, Bias, SlidingPolicy, Variant};

/// `Qwen3ForCausalLM`.
pub struct Qwen3;

static VARIANT: Variant = Variant {
    name: "Qwen3ForCausalLM",
    model_type: "qwen3",
    qkv_bias: Bias::AttentionBiasField,
    o_bias: Bias::AttentionBiasField,
    mlp_bias: Bias::Never,
    qk_norm: true,
    default_head_dim: Some(128),
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::QwenStyle,
    default_max_window_layers: 28,
    harmless_keys: &["max_window_layers", "use_sliding_window"],
};

impl Architecture for Qwen3 {
    fn variant(&self) -> &'static Variant {
        &VARIANT
    }
}
