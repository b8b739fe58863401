//! Mistral (`MistralForCausalLM`): no biases, sliding window on every layer when set.

use crate::arch::{Architecture, Bias, SlidingPolicy, Variant};

/// `MistralForCausalLM`.
pub struct Mistral;

static VARIANT: Variant = Variant {
    name: "MistralForCausalLM",
    model_type: "mistral",
    qkv_bias: Bias::Never,
    o_bias: Bias::Never,
    mlp_bias: Bias::Never,
    qk_norm: false,
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::AllLayers,
    default_max_window_layers: 0,
    harmless_keys: &[],
};

impl Architecture for Mistral {
    fn variant(&self) -> &'static Variant {
        &VARIANT
    }
}
