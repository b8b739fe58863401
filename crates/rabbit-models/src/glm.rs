//! GLM-4 (`GlmForCausalLM`, `glm-4-9b-*-hf`) and GLM-4-0414 (`Glm4ForCausalLM`): biases on q/k/v,
//! rotary on half of each head in interleaved pairs, fused `gate_up_proj`. GLM-4-0414 adds norms
//! after attention and after the MLP (the sandwich program).

use serde_json::{json, Map, Value};

use crate::arch::{Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, LayerProgram, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

static GLM_VARIANT: Variant = Variant {
    name: "GlmForCausalLM",
    model_type: "glm",
    default_head_dim: Some(128),
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1.5625e-07,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: Some(0.5),
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &[],
};

static GLM4_VARIANT: Variant = Variant {
    name: "Glm4ForCausalLM",
    model_type: "glm4",
    ..GLM_VARIANT
};

/// `GlmForCausalLM`.
pub struct Glm;
/// `Glm4ForCausalLM`.
pub struct Glm4;

fn glm_spec(
    v: &'static Variant,
    cfg: &HfConfig,
    gen: Option<&GenerationConfig>,
    post_norms: bool,
) -> Result<ModelSpec> {
    let mut spec = Resolver::new(v, cfg, gen).base()?;
    spec.rope.interleaved = true;
    let (h, q, kv, m) = (
        spec.hidden_size,
        spec.q_dim(),
        spec.kv_dim(),
        spec.intermediate_size,
    );
    // transformers' default for both: q/k/v biased.
    let bias = cfg.attention_bias.unwrap_or(true);
    let mut layer = vec![
        Param::norm(Role::AttnNorm, "input_layernorm", h, false),
        Param::linear(Role::Q, "self_attn.q_proj", q, h, bias),
        Param::linear(Role::K, "self_attn.k_proj", kv, h, bias),
        Param::linear(Role::V, "self_attn.v_proj", kv, h, bias),
        Param::linear(Role::O, "self_attn.o_proj", h, q, false),
        Param::norm(Role::MlpNorm, "post_attention_layernorm", h, false),
        Param::linear(Role::GateUp, "mlp.gate_up_proj", 2 * m, h, false),
        Param::linear(Role::Down, "mlp.down_proj", h, m, false),
    ];
    if post_norms {
        spec.program = LayerProgram::Sandwich;
        layer.push(Param::norm(
            Role::AttnPostNorm,
            "post_self_attn_layernorm",
            h,
            false,
        ));
        layer.push(Param::norm(
            Role::MlpPostNorm,
            "post_mlp_layernorm",
            h,
            false,
        ));
    }
    spec.tensors = TensorLayout::llama_names(layer);
    Ok(spec)
}

fn synth(s: &SynthShape) -> Option<Map<String, Value>> {
    match json!({"attention_bias": true, "head_dim": s.head_dim, "partial_rotary_factor": 0.5}) {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

impl Architecture for Glm {
    fn variant(&self) -> &'static Variant {
        &GLM_VARIANT
    }

    fn key(&self) -> &'static str {
        "glm"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        glm_spec(&GLM_VARIANT, cfg, gen, false)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        synth(s)
    }
}

impl Architecture for Glm4 {
    fn variant(&self) -> &'static Variant {
        &GLM4_VARIANT
    }

    fn key(&self) -> &'static str {
        "glm4"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        glm_spec(&GLM4_VARIANT, cfg, gen, true)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        synth(s)
    }
}
