//! Mistral (`MistralForCausalLM`): no biases, sliding window on every layer when set.

use serde_json::json;

use crate::arch::{SlidingPolicy, Variant};
use crate::blocks::Activation;
use crate::lineage::{Bias, LlamaLineage};

static VARIANT: Variant = Variant {
    name: "MistralForCausalLM",
    model_type: "mistral",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::AllLayers,
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &[],
};

/// `MistralForCausalLM`.
pub static MISTRAL: LlamaLineage = LlamaLineage {
    variant: &VARIANT,
    key: "mistral",
    qkv_bias: Bias::Never,
    o_bias: Bias::Never,
    mlp_bias: Bias::Never,
    qk_norm: false,
    synth: |_| json!({"sliding_window": null}),
};
