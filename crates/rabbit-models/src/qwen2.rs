//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): bias on q/k/v (not o), Qwen-style sliding window.

use serde_json::json;

use crate::arch::{SlidingPolicy, Variant};
use crate::blocks::Activation;
use crate::lineage::{Bias, LlamaLineage};

static VARIANT: Variant = Variant {
    name: "Qwen2ForCausalLM",
    model_type: "qwen2",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::QwenStyle,
    default_max_window_layers: 28,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &["max_window_layers", "use_sliding_window"],
};

/// `Qwen2ForCausalLM`.
pub static QWEN2: LlamaLineage = LlamaLineage {
    variant: &VARIANT,
    key: "qwen2",
    qkv_bias: Bias::Always,
    o_bias: Bias::Never,
    mlp_bias: Bias::Never,
    qk_norm: false,
    synth: |s| {
        json!({"tie_word_embeddings": true, "max_window_layers": s.layers, "sliding_window": null,
               "use_sliding_window": false})
    },
};
