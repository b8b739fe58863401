//! The Qwen mixtures of experts: Qwen2-MoE (`Qwen2MoeForCausalLM`: q/k/v biases, a shared
//! expert scaled by a sigmoid gate) and Qwen3-MoE (`Qwen3MoeForCausalLM`: per-head q/k norms,
//! no shared expert). Both route with a softmax over `num_experts`, keep the top
//! `num_experts_per_tok` (renormalised when `norm_topk_prob`), and run a dense MLP of
//! `intermediate_size` in the layers `mlp_only_layers` names and between every
//! `decoder_sparse_step`-th layer.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::lineage::{attention_projections, separate_projections};
use crate::moe::{
    qwen_sparse_layers, take_num_experts, ExpertMlp, MoeNames, MoeSpec, Routing, SharedExpert,
};
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

/// Training-only keys of both families, and the sliding-window keys of a window that is off.
const HARMLESS: &[&str] = &[
    "output_router_logits",
    "router_aux_loss_coef",
    "max_window_layers",
    "use_sliding_window",
];

const COMMON: Variant = Variant {
    name: "Qwen2MoeForCausalLM",
    model_type: "qwen2_moe",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::QwenStyle,
    default_max_window_layers: 28,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: HARMLESS,
};

static QWEN2_VARIANT: Variant = COMMON;

static QWEN3_VARIANT: Variant = Variant {
    name: "Qwen3MoeForCausalLM",
    model_type: "qwen3_moe",
    ..COMMON
};

/// One of the Qwen mixtures of experts.
pub struct QwenMoe {
    variant: &'static Variant,
    key: &'static str,
    /// Qwen2-MoE: a shared expert with its sigmoid gate, and `qkv_bias`.
    qwen2: bool,
}

/// `Qwen2MoeForCausalLM`.
pub static QWEN2_MOE: QwenMoe = QwenMoe {
    variant: &QWEN2_VARIANT,
    key: "qwen2_moe",
    qwen2: true,
};

/// `Qwen3MoeForCausalLM`.
pub static QWEN3_MOE: QwenMoe = QwenMoe {
    variant: &QWEN3_VARIANT,
    key: "qwen3_moe",
    qwen2: false,
};

impl Architecture for QwenMoe {
    fn variant(&self) -> &'static Variant {
        self.variant
    }

    fn key(&self) -> &'static str {
        self.key
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = self.variant;
        if cfg.use_sliding_window == Some(true) {
            // Qwen2-MoE windows alternate layers below `max_window_layers`, Qwen3-MoE every
            // layer; no released checkpoint turns it on.
            return Err(unsupported(
                v,
                "`use_sliding_window: true` is not supported for this architecture",
            ));
        }
        let mut r = Resolver::new(v, cfg, gen);
        let (default_experts, default_k, default_inter) = if self.qwen2 {
            (60, 4, 1408)
        } else {
            (128, 8, 768)
        };
        let experts = take_num_experts(&mut r, default_experts)?;
        let top_k: usize = r
            .take_or("num_experts_per_tok", Some(default_k))?
            .unwrap_or(0);
        let inter: usize = r
            .take_or("moe_intermediate_size", Some(default_inter))?
            .unwrap_or(0);
        let norm_topk: bool = r.take_or("norm_topk_prob", Some(false))?.unwrap_or(false);
        // `null` is refused as 0 is (transformers cannot take it either).
        let step: usize = r.take_or("decoder_sparse_step", Some(1))?.unwrap_or(0);
        let mlp_only: Vec<usize> = r.take("mlp_only_layers")?.unwrap_or_default();
        let (shared, qkv_bias) = if self.qwen2 {
            let s: usize = r
                .take_or("shared_expert_intermediate_size", Some(5632))?
                .unwrap_or(0);
            let bias: bool = r.take_or("qkv_bias", Some(true))?.unwrap_or(false);
            (
                Some(SharedExpert {
                    intermediate: s,
                    gated: true,
                }),
                bias,
            )
        } else {
            (None, cfg.attention_bias.unwrap_or(false))
        };
        let mut spec = r.base()?;
        let sparse_layers = qwen_sparse_layers(v, spec.num_layers, step, &mlp_only)?;
        let moe = MoeSpec {
            num_experts: experts,
            top_k,
            expert_intermediate: inter,
            routing: Routing::SoftmaxTopK,
            renormalize: norm_topk,
            router_f32: false,
            scaling: 1.0,
            expert_mlp: ExpertMlp::Gated,
            weights_in_compute_dtype: true,
            shared,
            sparse_layers,
        };
        moe.check(v, "num_experts", "moe_intermediate_size")?;
        moe.check_total(v, spec.hidden_size)?;
        let h = spec.hidden_size;
        // Qwen3-MoE's o_proj carries `attention_bias` too; Qwen2-MoE's never has one.
        let o_bias = !self.qwen2 && qkv_bias;
        let mut common = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
        common.extend(attention_projections(&spec, qkv_bias, o_bias));
        if !self.qwen2 {
            let d = spec.head_dim;
            common.push(Param::norm(Role::QNorm, "self_attn.q_norm", d, false));
            common.push(Param::norm(Role::KNorm, "self_attn.k_norm", d, false));
        }
        common.push(Param::norm(
            Role::MlpNorm,
            "post_attention_layernorm",
            h,
            false,
        ));
        let names = MoeNames {
            router: "mlp.gate",
            experts: "mlp.experts.",
            projections: ["gate_proj", "up_proj", "down_proj"],
            shared: self
                .qwen2
                .then_some(("mlp.shared_expert", "mlp.shared_expert_gate")),
            router_bias: None,
        };
        let mut sparse = common.clone();
        sparse.extend(names.params(&moe, h));
        let mut layers = TensorLayout::llama_names(sparse);
        if moe.sparse_layers.iter().any(|s| !s) {
            let mut dense = common;
            dense.extend(
                separate_projections(&spec, false, false, false)
                    .into_iter()
                    .filter(|p| matches!(p.role, Role::Gate | Role::Up | Role::Down)),
            );
            layers.dense_layer = dense;
        }
        spec.tensors = layers;
        spec.moe = Some(moe);
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        let mut cfg = json!({
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": (s.hidden / 2).max(1),
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": !self.qwen2,
            "use_sliding_window": false, "sliding_window": null, "max_window_layers": s.layers,
            "router_aux_loss_coef": 0.001, "output_router_logits": false, "tie_word_embeddings": false,
        });
        let m = cfg.as_object_mut()?;
        if self.qwen2 {
            m.insert(
                "shared_expert_intermediate_size".into(),
                json!(s.hidden * 2),
            );
            m.insert("qkv_bias".into(), json!(true));
        } else {
            m.insert("head_dim".into(), json!(s.head_dim));
            m.insert("attention_bias".into(), json!(false));
        }
        Some(cfg.as_object()?.clone())
    }
}
