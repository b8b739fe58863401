//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): bias on q/k/v (not o), Qwen-style sliding window.

use crate::arch::{Architecture, Bias, SlidingPolicy, Variant};

/// `Qwen2ForCausalLM`.
pub struct Qwen2;

static VARIANT: Variant = Variant {
    name: "Qwen2ForCausalLM",
    model_type: "qwen2",
    qkv_bias: Bias::Always,
    o_bias: Bias::Never,
    mlp_bias: Bias::Never,
    qk_norm: false,
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::QwenStyle,
    default_max_window_layers: 28,
    harmless_keys: &["max_window_layers", "use_sliding_window"],
};

impl Architecture for Qwen2 {
    fn variant(&self) -> &'static Variant {
        &VARIANT
    }
}
