//! gpt-oss (`GptOssForCausalLM`): alternating sliding-window (128) and full-attention layers,
//! biases on q/k/v/o, an attention sink per head, RMSNorm weighted in f32, and a mixture of
//! `num_local_experts` in every layer: the router (with a bias) keeps the top
//! `num_experts_per_tok` logits and softmaxes those; each expert is a clamped SwiGLU over
//! interleaved gate/up columns. The checkpoint stacks every expert's tensors
//! (`mlp.experts.gate_up_proj` `[experts, hidden, 2 * intermediate]` and its bias, `down_proj`
//! and its bias); each expert is read as its own row of them.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, NormKind, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::lineage::attention_projections;
use crate::moe::{take_num_experts, ExpertMlp, MoeSpec, Routing};
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

static VARIANT: Variant = Variant {
    name: "GptOssForCausalLM",
    model_type: "gpt_oss",
    default_head_dim: Some(64),
    default_rope_theta: 150_000.0,
    default_rms_norm_eps: 1e-5,
    sliding: SlidingPolicy::Pattern {
        period: 2,
        default_window: 128,
    },
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    // Training-only settings, and the context the model was first trained at (the rope's
    // `original_max_position_embeddings` says what matters of it).
    harmless_keys: &[
        "output_router_logits",
        "router_aux_loss_coef",
        "initial_context_length",
    ],
};

/// `GptOssForCausalLM`.
pub struct GptOss;

impl Architecture for GptOss {
    fn variant(&self) -> &'static Variant {
        &VARIANT
    }

    fn key(&self) -> &'static str {
        "gpt_oss"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = &VARIANT;
        let mut r = Resolver::new(v, cfg, gen);
        let experts = take_num_experts(&mut r, 128)?;
        let top_k: usize = r.take_or("num_experts_per_tok", Some(4))?.unwrap_or(0);
        // openai's own configs also spell it `experts_per_token`.
        if let Some(k) = r.take::<usize>("experts_per_token")? {
            if k != top_k {
                return Err(unsupported(
                    v,
                    format!(
                        "`experts_per_token` ({k}) and `num_experts_per_tok` ({top_k}) disagree"
                    ),
                ));
            }
        }
        let number = |r: &mut Resolver<'_>, key: &str, default: f64| -> Result<f64> {
            match r.take_or(key, Some(default))? {
                Some(x) if x > 0.0 && f64::is_finite(x) => Ok(x),
                _ => Err(unsupported(v, format!("`{key}` must be a positive number"))),
            }
        };
        let alpha = number(&mut r, "swiglu_alpha", 1.702)?;
        let limit = number(&mut r, "swiglu_limit", 7.0)?;
        let mut spec = r.base()?;
        let moe = MoeSpec {
            num_experts: experts,
            top_k,
            expert_intermediate: spec.intermediate_size,
            routing: Routing::TopKSoftmax,
            renormalize: false,
            router_f32: false,
            scaling: 1.0,
            expert_mlp: ExpertMlp::ClampedSwiglu { alpha, limit },
            weights_in_compute_dtype: true,
            shared: None,
            sparse_layers: vec![true; spec.num_layers],
        };
        moe.check(v, "num_local_experts", "intermediate_size")?;
        moe.check_total(v, spec.hidden_size)?;
        let (h, m) = (spec.hidden_size, moe.expert_intermediate);
        let bias = cfg.attention_bias.unwrap_or(true);
        let mut layer = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
        layer.extend(attention_projections(&spec, bias, bias));
        layer.push(Param::vector(
            Role::Sinks,
            "self_attn.sinks",
            spec.num_heads,
        ));
        layer.push(Param::norm(
            Role::MlpNorm,
            "post_attention_layernorm",
            h,
            false,
        ));
        layer.push(Param::linear(Role::Router, "mlp.router", experts, h, true));
        if spec.mxfp4 && (h % 32 != 0 || m % 32 != 0) {
            return Err(unsupported(
                v,
                format!("MXFP4 experts need `hidden_size` ({h}) and `intermediate_size` ({m}) to be multiples of 32"),
            ));
        }
        let (gu, down) = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj");
        for e in 0..experts {
            let part =
                |role, base: &str, shape: Vec<usize>| Param::stacked_part(role, base, e, shape);
            if spec.mxfp4 {
                layer.extend([
                    part(
                        Role::ExpertGateUpBlocks,
                        &format!("{gu}_blocks"),
                        vec![2 * m, h / 32, 16],
                    ),
                    part(
                        Role::ExpertGateUpScales,
                        &format!("{gu}_scales"),
                        vec![2 * m, h / 32],
                    ),
                    part(Role::ExpertGateUpBias, &format!("{gu}_bias"), vec![2 * m]),
                    part(
                        Role::ExpertDownBlocks,
                        &format!("{down}_blocks"),
                        vec![h, m / 32, 16],
                    ),
                    part(
                        Role::ExpertDownScales,
                        &format!("{down}_scales"),
                        vec![h, m / 32],
                    ),
                    part(Role::ExpertDownBias, &format!("{down}_bias"), vec![h]),
                ]);
            } else {
                layer.extend([
                    part(Role::ExpertGateUpT, gu, vec![h, 2 * m]),
                    part(Role::ExpertGateUpBias, &format!("{gu}_bias"), vec![2 * m]),
                    part(Role::ExpertDownT, down, vec![m, h]),
                    part(Role::ExpertDownBias, &format!("{down}_bias"), vec![h]),
                ]);
            }
        }
        if spec.mxfp4 {
            spec.notes.push(
                "MXFP4 experts are read as stored and dequantized to the compute dtype after each read".into(),
            );
        }
        spec.tensors = TensorLayout::llama_names(layer);
        spec.norm.kind = NormKind::RmsWeightF32;
        spec.moe = Some(moe);
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        match json!({"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 16,
                     "swiglu_limit": 7.0, "attention_bias": true, "head_dim": s.head_dim,
                     "initial_context_length": 4096, "router_aux_loss_coef": 0.9,
                     "output_router_logits": false, "tie_word_embeddings": false})
        {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    fn synth_finish(&self, cfg: &mut Map<String, Value>) {
        // openai's configs carry both spellings of the routed count.
        if let Some(k) = cfg.get("num_experts_per_tok").cloned() {
            cfg.insert("experts_per_token".into(), k);
        }
    }
}
