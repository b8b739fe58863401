//! Llama 2 / 3 / 3.1 / 3.2 (`LlamaForCausalLM`): optional attention and MLP bias, no sliding
//! window; rope scaling (`llama3`, `linear`, `dynamic`, `yarn`) comes from the shared resolver.

use crate::arch::{Architecture, Bias, SlidingPolicy, Variant};

/// `LlamaForCausalLM`.
pub struct Llama;

static VARIANT: Variant = Variant {
    name: "LlamaForCausalLM",
    model_type: "llama",
    qkv_bias: Bias::AttentionBiasField,
    o_bias: Bias::AttentionBiasField,
    mlp_bias: Bias::MlpBiasField,
    qk_norm: false,
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    // pretraining_tp only slices the matmuls differently during pre-training.
    harmless_keys: &["pretraining_tp"],
};

impl Architecture for Llama {
    fn variant(&self) -> &'static Variant {
        &VARIANT
    }
}
