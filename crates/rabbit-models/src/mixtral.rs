//! Mixtral (`MixtralForCausalLM`): Mistral's attention with a mixture of experts in every layer:
//! softmax over `num_local_experts`, the top `num_experts_per_tok` renormalised, each expert a
//! SwiGLU MLP of `intermediate_size` (`block_sparse_moe.experts.N.w1/w3/w2`).

use serde_json::{json, Map, Value};

use crate::arch::{Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::lineage::attention_projections;
use crate::moe::{take_num_experts, ExpertMlp, MoeNames, MoeSpec, Routing};
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

static VARIANT: Variant = Variant {
    name: "MixtralForCausalLM",
    model_type: "mixtral",
    default_head_dim: None,
    default_rope_theta: 1_000_000.0,
    default_rms_norm_eps: 1e-5,
    sliding: SlidingPolicy::AllLayers,
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    // Training-only: the auxiliary loss, router logits as outputs, the router's jitter noise
    // (applied only in training mode).
    harmless_keys: &[
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
    ],
};

const NAMES: MoeNames = MoeNames {
    router: "block_sparse_moe.gate",
    experts: "block_sparse_moe.experts.",
    projections: ["w1", "w3", "w2"],
    shared: None,
    router_bias: None,
};

/// `MixtralForCausalLM`.
pub struct Mixtral;

impl Architecture for Mixtral {
    fn variant(&self) -> &'static Variant {
        &VARIANT
    }

    fn key(&self) -> &'static str {
        "mixtral"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let mut r = Resolver::new(&VARIANT, cfg, gen);
        let experts = take_num_experts(&mut r, 8)?;
        let top_k: usize = r.take_or("num_experts_per_tok", Some(2))?.unwrap_or(0);
        let mut spec = r.base()?;
        let moe = MoeSpec {
            num_experts: experts,
            top_k,
            expert_intermediate: spec.intermediate_size,
            routing: Routing::SoftmaxTopK,
            renormalize: true,
            router_f32: false,
            scaling: 1.0,
            expert_mlp: ExpertMlp::Gated,
            weights_in_compute_dtype: false,
            shared: None,
            sparse_layers: vec![true; spec.num_layers],
        };
        moe.check(&VARIANT, "num_local_experts", "intermediate_size")?;
        moe.check_total(&VARIANT, spec.hidden_size)?;
        let h = spec.hidden_size;
        let mut layer = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
        layer.extend(attention_projections(&spec, false, false));
        layer.push(Param::norm(
            Role::MlpNorm,
            "post_attention_layernorm",
            h,
            false,
        ));
        layer.extend(NAMES.params(&moe, h));
        spec.tensors = TensorLayout::llama_names(layer);
        spec.moe = Some(moe);
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        let _ = s;
        match json!({"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": null,
                     "router_aux_loss_coef": 0.02, "output_router_logits": false,
                     "router_jitter_noise": 0.0})
        {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}
