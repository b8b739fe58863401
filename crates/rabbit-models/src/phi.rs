//! Phi-3 / Phi-3.5 / Phi-4 (`Phi3ForCausalLM`): the Llama program over fused `qkv_proj` and
//! `gate_up_proj`, partial rotary, LongRoPE, sliding window on every layer when set. Phi-2
//! (`PhiForCausalLM`): LayerNorm with bias, attention and MLP in parallel, partial rotary,
//! `gelu_new`, biases everywhere (LM head included, which keeps its own bias when its weight is
//! tied), optional per-head q/k LayerNorm.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, LayerProgram, NormKind, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

/// Dropout rates: training only.
const DROPOUT: &[&str] = &["resid_pdrop", "embd_pdrop"];

static PHI3_VARIANT: Variant = Variant {
    name: "Phi3ForCausalLM",
    model_type: "phi3",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-5,
    sliding: SlidingPolicy::AllLayers,
    default_max_window_layers: 0,
    partial_rotary: Some(1.0),
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: DROPOUT,
};

static PHI_VARIANT: Variant = Variant {
    name: "PhiForCausalLM",
    model_type: "phi",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-5,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: Some(0.5),
    tied_by_default: false,
    activation: ("hidden_act", Activation::GeluNew),
    harmless_keys: DROPOUT,
};

/// `Phi3ForCausalLM`.
pub struct Phi3;
/// `PhiForCausalLM` (Phi-1, Phi-1.5, Phi-2).
pub struct Phi;

impl Architecture for Phi3 {
    fn variant(&self) -> &'static Variant {
        &PHI3_VARIANT
    }

    fn key(&self) -> &'static str {
        "phi3"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = &PHI3_VARIANT;
        let mut r = Resolver::new(v, cfg, gen);
        // Phi-3 keeps the pre-training length at the top level, and transformers gives it
        // priority over the rope settings' own.
        let original: Option<usize> = r.take("original_max_position_embeddings")?;
        let params = match (&cfg.rope_parameters, &cfg.rope_scaling) {
            (Some(p), Some(s)) if !p.is_null() && !s.is_null() && p != s => {
                return Err(unsupported(
                    v,
                    "both `rope_parameters` and `rope_scaling` are set and differ",
                ))
            }
            (Some(p), _) if !p.is_null() => Some(p.clone()),
            (_, Some(s)) if !s.is_null() => Some(s.clone()),
            _ => None,
        };
        if let (Some(o), Some(Value::Object(mut p))) = (original, params.clone()) {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str);
            if matches!(kind, Some("longrope" | "yarn" | "llama3")) {
                p.insert("original_max_position_embeddings".into(), json!(o));
                r.set_rope_params(Some(Value::Object(p)));
            }
        }
        let mut spec = r.base()?;
        if cfg.attention_bias == Some(true) {
            return Err(unsupported(v, "`attention_bias` true is not part of Phi-3"));
        }
        let (h, q, kv, m) = (
            spec.hidden_size,
            spec.q_dim(),
            spec.kv_dim(),
            spec.intermediate_size,
        );
        spec.tensors = TensorLayout::llama_names(vec![
            Param::norm(Role::AttnNorm, "input_layernorm", h, false),
            Param::linear(Role::Qkv, "self_attn.qkv_proj", q + 2 * kv, h, false),
            Param::linear(Role::O, "self_attn.o_proj", h, q, false),
            Param::norm(Role::MlpNorm, "post_attention_layernorm", h, false),
            Param::linear(Role::GateUp, "mlp.gate_up_proj", 2 * m, h, false),
            Param::linear(Role::Down, "mlp.down_proj", h, m, false),
        ]);
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        let _ = s;
        match json!({"sliding_window": null, "resid_pdrop": 0.0, "embd_pdrop": 0.0}) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}

impl Architecture for Phi {
    fn variant(&self) -> &'static Variant {
        &PHI_VARIANT
    }

    fn key(&self) -> &'static str {
        "phi"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = &PHI_VARIANT;
        let mut r = Resolver::new(v, cfg, gen);
        let eps = r
            .take_or::<f64>("layer_norm_eps", Some(1e-5))?
            .unwrap_or(1e-5);
        let qk_layernorm = r.take::<bool>("qk_layernorm")?.unwrap_or(false);
        if cfg.rms_norm_eps.is_some() {
            return Err(unsupported(
                v,
                "`rms_norm_eps` is not a Phi field (it uses LayerNorm with `layer_norm_eps`)",
            ));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(unsupported(
                v,
                format!("`layer_norm_eps` must be a positive number, got {eps}"),
            ));
        }
        let mut spec = r.base()?;
        if qk_layernorm && spec.head_dim * spec.num_heads != spec.hidden_size {
            // transformers sizes these norms hidden_size / num_attention_heads.
            return Err(unsupported(
                v,
                "`qk_layernorm` needs `head_dim` = hidden_size / num_attention_heads",
            ));
        }
        spec.norm.kind = NormKind::Layer;
        spec.norm.eps = eps;
        spec.program = LayerProgram::Parallel;
        let (h, q, kv, m) = (
            spec.hidden_size,
            spec.q_dim(),
            spec.kv_dim(),
            spec.intermediate_size,
        );
        let mut t = TensorLayout::llama_names(vec![
            Param::norm(Role::AttnNorm, "input_layernorm", h, true),
            Param::linear(Role::Q, "self_attn.q_proj", q, h, true),
            Param::linear(Role::K, "self_attn.k_proj", kv, h, true),
            Param::linear(Role::V, "self_attn.v_proj", kv, h, true),
            Param::linear(Role::O, "self_attn.dense", h, q, true),
            Param::linear(Role::Up, "mlp.fc1", m, h, true),
            Param::linear(Role::Down, "mlp.fc2", h, m, true),
        ]);
        if qk_layernorm {
            let d = spec.head_dim;
            t.layer
                .push(Param::norm(Role::QNorm, "self_attn.q_layernorm", d, true));
            t.layer
                .push(Param::norm(Role::KNorm, "self_attn.k_layernorm", d, true));
        }
        t.final_norm = "model.final_layernorm".into();
        t.final_norm_bias = true;
        t.lm_head_bias = true;
        spec.tensors = t;
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        let _ = s;
        match json!({"hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "qk_layernorm": false,
                     "partial_rotary_factor": 0.4, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                     "rms_norm_eps": null})
        {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}
