//! Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 (`Gemma3ForCausalLM`, and the language model of
//! `Gemma3ForConditionalGeneration`): sandwich norms of the `1 + w` form, embeddings scaled by
//! `sqrt(hidden_size)`, GeGLU, `query_pre_attn_scalar`, sliding window on all layers but every
//! `period`-th. Gemma 2 soft-caps attention scores and the final logits; Gemma 3 has q/k norms
//! and a separate rope base for its local (sliding) layers.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, LayerProgram, NormKind, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::lineage::separate_projections;
use crate::resolve::{rope_from, Resolver};
use crate::spec::ModelSpec;

/// Keys of Gemma configs that cannot change inference.
const HARMLESS: &[&str] = &["cache_implementation"];

static GEMMA2_VARIANT: Variant = Variant {
    name: "Gemma2ForCausalLM",
    model_type: "gemma2",
    default_head_dim: Some(256),
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Pattern {
        period: 2,
        default_window: 4096,
    },
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: true,
    activation: ("hidden_activation", Activation::GeluTanh),
    harmless_keys: HARMLESS,
};

static GEMMA3_VARIANT: Variant = Variant {
    name: "Gemma3ForCausalLM",
    model_type: "gemma3_text",
    default_head_dim: Some(256),
    default_rope_theta: 1_000_000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Pattern {
        period: 6,
        default_window: 4096,
    },
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: true,
    activation: ("hidden_activation", Activation::GeluTanh),
    harmless_keys: HARMLESS,
};

static GEMMA3_CG_VARIANT: Variant = Variant {
    name: "Gemma3ForConditionalGeneration",
    model_type: "gemma3",
    ..GEMMA3_VARIANT
};

/// `Gemma2ForCausalLM`.
pub struct Gemma2;
/// `Gemma3ForCausalLM` (text only).
pub struct Gemma3;
/// `Gemma3ForConditionalGeneration`: its language model; the vision tower is not used.
pub struct Gemma3Multimodal;

/// What Gemma 2 and 3 share after the common resolution.
fn gemma_blocks(
    r: &mut Resolver<'_>,
    softcap_defaults: (Option<f64>, Option<f64>),
) -> Result<GemmaKeys> {
    let v = r.variant();
    let query_pre_attn_scalar = r.take_or::<f64>("query_pre_attn_scalar", Some(256.0))?;
    let attn_softcap = r.take_or::<f64>("attn_logit_softcapping", softcap_defaults.0)?;
    let final_softcap = r.take_or::<f64>("final_logit_softcapping", softcap_defaults.1)?;
    for (name, value) in [
        ("query_pre_attn_scalar", query_pre_attn_scalar),
        ("attn_logit_softcapping", attn_softcap),
        ("final_logit_softcapping", final_softcap),
    ] {
        if let Some(x) = value {
            if !(x > 0.0 && x.is_finite()) {
                return Err(unsupported(
                    v,
                    format!("`{name}` must be a positive number, got {x}"),
                ));
            }
        }
    }
    if r.take::<bool>("use_bidirectional_attention")? == Some(true) {
        return Err(unsupported(
            v,
            "`use_bidirectional_attention` true (an encoder) is not supported",
        ));
    }
    Ok(GemmaKeys {
        query_pre_attn_scalar,
        attn_softcap,
        final_softcap,
    })
}

struct GemmaKeys {
    query_pre_attn_scalar: Option<f64>,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
}

/// Sets Gemma's blocks and tensors on a resolved spec.
fn finish(spec: &mut ModelSpec, k: &GemmaKeys, qk_norm: bool, cfg: &HfConfig) {
    let (h, d) = (spec.hidden_size, spec.head_dim);
    spec.norm.kind = NormKind::RmsOffset;
    spec.program = LayerProgram::Sandwich;
    spec.embed_scale = Some((h as f64).sqrt());
    spec.attention.scale = 1.0 / k.query_pre_attn_scalar.unwrap_or(d as f64).sqrt();
    spec.attention.softcap = k.attn_softcap;
    spec.final_logit_softcap = k.final_softcap;
    let bias = cfg.attention_bias.unwrap_or(false);
    let mut layer = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
    layer.extend(separate_projections(spec, bias, bias, false));
    if qk_norm {
        layer.push(Param::norm(Role::QNorm, "self_attn.q_norm", d, false));
        layer.push(Param::norm(Role::KNorm, "self_attn.k_norm", d, false));
    }
    layer.extend([
        Param::norm(Role::AttnPostNorm, "post_attention_layernorm", h, false),
        Param::norm(Role::MlpNorm, "pre_feedforward_layernorm", h, false),
        Param::norm(Role::MlpPostNorm, "post_feedforward_layernorm", h, false),
    ]);
    spec.tensors = TensorLayout::llama_names(layer);
}

impl Architecture for Gemma2 {
    fn variant(&self) -> &'static Variant {
        &GEMMA2_VARIANT
    }

    fn key(&self) -> &'static str {
        "gemma2"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let mut r = Resolver::new(&GEMMA2_VARIANT, cfg, gen);
        let keys = gemma_blocks(&mut r, (Some(50.0), Some(30.0)))?;
        // Early Gemma 2 configs repeat the window as `sliding_window_size` (transformers ignores
        // it): fine when it agrees.
        if let Some(size) = r.take::<usize>("sliding_window_size")? {
            if cfg.sliding_window.is_some_and(|w| w != size) {
                return Err(unsupported(
                    &GEMMA2_VARIANT,
                    format!(
                        "`sliding_window_size` ({size}) contradicts `sliding_window` ({})",
                        cfg.sliding_window.unwrap_or_default()
                    ),
                ));
            }
        }
        let mut spec = r.base()?;
        finish(&mut spec, &keys, false, cfg);
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        obj(json!({
            "attention_bias": false,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "head_dim": s.head_dim,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": s.head_dim,
            "sliding_window": 4096,
            "cache_implementation": "hybrid",
        }))
    }
}

/// Gemma 3's resolution of a text config (shared with the multimodal checkpoint's
/// `text_config`).
fn gemma3_spec(
    v: &'static Variant,
    cfg: &HfConfig,
    gen: Option<&GenerationConfig>,
) -> Result<ModelSpec> {
    let mut r = Resolver::new(v, cfg, gen);
    if v.model_type == GEMMA3_CG_VARIANT.model_type {
        // The image side of a multimodal checkpoint: not used for text.
        for key in MULTIMODAL_KEYS {
            r.take::<Value>(key)?;
        }
    }
    let keys = gemma_blocks(&mut r, (None, None))?;
    // The layer pattern: `_sliding_window_pattern` (transformers 5) or `sliding_window_pattern`.
    let new: Option<usize> = r.take("_sliding_window_pattern")?;
    let old: Option<usize> = r.take("sliding_window_pattern")?;
    match (new, old) {
        (Some(a), Some(b)) if a != b => {
            return Err(unsupported(
                v,
                format!(
                    "`_sliding_window_pattern` ({a}) and `sliding_window_pattern` ({b}) disagree"
                ),
            ))
        }
        (Some(p), _) | (None, Some(p)) => r.set_pattern_period(p)?,
        (None, None) => {}
    }
    let local_base: Option<f64> = r.take("rope_local_base_freq")?;
    // transformers 5 keys rope settings by layer type; classic configs give the global rope in
    // `rope_theta`/`rope_scaling` and the local base in `rope_local_base_freq`.
    let nested = cfg
        .rope_parameters
        .as_ref()
        .and_then(Value::as_object)
        .filter(|o| o.contains_key("full_attention") || o.contains_key("sliding_attention"))
        .cloned();
    let mut local_params = None;
    let old_type_key = cfg
        .rope_scaling
        .as_ref()
        .and_then(Value::as_object)
        .is_some_and(|o| o.contains_key("type") && !o.contains_key("rope_type"));
    if old_type_key {
        // transformers 5.23 turns such a `rope_scaling` into `rope_type: default` for Gemma 3
        // (the scaling is silently dropped); either reading would surprise someone.
        return Err(unsupported(
            v,
            "`rope_scaling` names its kind with the old `type` key, which transformers ignores for \
             Gemma 3 (it runs without the scaling): write `rope_type` instead",
        ));
    }
    if let Some(n) = &nested {
        if let Some(k) = n
            .keys()
            .find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention"))
        {
            return Err(unsupported(
                v,
                format!("`rope_parameters.{k}` is not a layer type this family has"),
            ));
        }
        if cfg.rope_scaling.as_ref().is_some_and(|s| !s.is_null()) {
            return Err(unsupported(
                v,
                "both `rope_scaling` and per-layer-type `rope_parameters` are set",
            ));
        }
        // transformers' YaRN reads `truncate` from the top level of `rope_parameters`, which
        // for per-layer-type settings never has it: it is always true there.
        let per_type = |key: &str| {
            n.get(key).cloned().map(|mut p| {
                if let Some(o) = p.as_object_mut() {
                    o.remove("truncate");
                }
                p
            })
        };
        r.set_rope_params(Some(per_type("full_attention").unwrap_or(json!({}))));
        local_params = per_type("sliding_attention");
    }
    let mut spec = r.base()?;
    finish(&mut spec, &keys, true, cfg);
    // transformers' Gemma 3 reads `attn_logit_softcapping` but never applies it, and its
    // multimodal head does not apply `final_logit_softcapping` either.
    spec.attention.softcap = None;
    if v.model_type == GEMMA3_CG_VARIANT.model_type {
        spec.final_logit_softcap = None;
    }
    let local_theta = local_params
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64);
    let theta = match (local_theta, local_base) {
        (Some(a), Some(b)) if a != b => {
            return Err(unsupported(
                v,
                format!("`rope_local_base_freq` ({b}) contradicts `rope_parameters.sliding_attention.rope_theta` ({a})"),
            ))
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => 10_000.0,
    };
    spec.local_rope = Some(rope_from(
        v,
        cfg,
        theta,
        spec.head_dim,
        local_params.as_ref(),
        spec.max_position_embeddings,
    )?);
    Ok(spec)
}

impl Architecture for Gemma3 {
    fn variant(&self) -> &'static Variant {
        &GEMMA3_VARIANT
    }

    fn key(&self) -> &'static str {
        "gemma3"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        gemma3_spec(&GEMMA3_VARIANT, cfg, gen)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        obj(json!({
            "attention_bias": false,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
            "head_dim": s.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": s.head_dim,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 1024,
            "sliding_window_pattern": 6,
            "use_bidirectional_attention": false,
        }))
    }
}

/// Top-level keys of a Gemma 3 multimodal config that only concern images.
const MULTIMODAL_KEYS: &[&str] = &[
    "vision_config",
    "boi_token_index",
    "eoi_token_index",
    "image_token_index",
    "mm_tokens_per_image",
    "boi_token_id",
    "eoi_token_id",
    "image_token_id",
];

impl Architecture for Gemma3Multimodal {
    fn variant(&self) -> &'static Variant {
        &GEMMA3_CG_VARIANT
    }

    fn key(&self) -> &'static str {
        "gemma3-multimodal"
    }

    /// config.json nests the language model in `text_config`; [`HfConfig`] reads it flat.
    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let mut spec = gemma3_spec(&GEMMA3_CG_VARIANT, cfg, gen)?;
        let t = &mut spec.tensors;
        // transformers 5 saves `model.language_model.*`; the hub's original checkpoints have
        // `language_model.model.*` (and `language_model.lm_head.weight` when untied).
        t.aliases = vec![
            ("model.language_model.".into(), "model.".into()),
            ("language_model.model.".into(), "model.".into()),
            ("language_model.lm_head.".into(), "lm_head.".into()),
        ];
        t.ignored_prefixes = [
            "vision_tower.",
            "multi_modal_projector.",
            "model.vision_tower.",
            "model.multi_modal_projector.",
        ]
        .map(String::from)
        .to_vec();
        spec.notes.push(
            "text only: the vision tower and projector of this checkpoint are not used".into(),
        );
        Ok(spec)
    }

    /// transformers' `Gemma3TextConfig` defaults: the hub's multimodal configs give only what
    /// differs from them (e.g. gemma-3-4b-it's text_config has six keys).
    fn text_config_defaults(&self) -> Option<Value> {
        // Only keys a config must have to be read; every other default is the family's own
        // (Variant, `take_or`), which a nested `rope_parameters` or `_sliding_window_pattern`
        // then cannot contradict.
        Some(json!({
            "vocab_size": 262_208,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 131_072,
        }))
    }

    /// Not synthesised: `rabbit synth --arch gemma3` writes the same language model.
    fn synth_config(&self, _: &SynthShape) -> Option<Map<String, Value>> {
        None
    }
}

fn obj(v: Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}
