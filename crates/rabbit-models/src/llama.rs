//! Llama 2 / 3 / 3.1 / 3.2 (`LlamaForCausalLM`): optional attention and MLP bias, no sliding
//! window; rope scaling (`llama3`, `linear`, `dynamic`, `yarn`) comes from the shared resolver.

use serde_json::json;

use crate::arch::{SlidingPolicy, Variant};
use crate::blocks::Activation;
use crate::lineage::{Bias, LlamaLineage};

static VARIANT: Variant = Variant {
    name: "LlamaForCausalLM",
    model_type: "llama",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    // pretraining_tp only slices the matmuls differently during pre-training.
    harmless_keys: &["pretraining_tp"],
};

/// `LlamaForCausalLM`.
pub static LLAMA: LlamaLineage = LlamaLineage {
    variant: &VARIANT,
    key: "llama",
    qkv_bias: Bias::AttentionBiasField,
    o_bias: Bias::AttentionBiasField,
    mlp_bias: Bias::MlpBiasField,
    qk_norm: false,
    synth: |s| {
        json!({"tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1,
               "head_dim": s.head_dim})
    },
};
