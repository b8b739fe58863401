//! QWen v1 (`QWenLMHeadModel`, Qwen-1.8B/7B/14B/72B and their Chat models, from the final
//! original remote code): fused `c_attn` with a bias, an MLP whose `w2` is the gate and `w1`
//! the up projection (`intermediate_size` counts both), and two long-context tricks past the
//! training length `seq_length`: dynamic NTK (a base chosen per sequence from its prompt length
//! and kept while generating) and log-n scaling of the queries.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::resolve::Resolver;
use crate::rope::RopeScaling;
use crate::spec::ModelSpec;

static QWEN1_VARIANT: Variant = Variant {
    name: "QWenLMHeadModel",
    model_type: "qwen",
    default_head_dim: Some(128),
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: Some(1.0),
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &[
        "emb_dropout_prob",
        "attn_dropout_prob",
        "onnx_safe",
        "use_flash_attn",
        "softmax_in_fp32",
    ],
};

/// QWenConfig's names for the common keys.
const ALIASES: &[(&str, &str)] = &[
    ("kv_channels", "head_dim"),
    ("layer_norm_epsilon", "rms_norm_eps"),
    ("rotary_emb_base", "rope_theta"),
    ("rotary_pct", "partial_rotary_factor"),
];

/// `QWenLMHeadModel`.
pub struct Qwen1;

impl Architecture for Qwen1 {
    fn variant(&self) -> &'static Variant {
        &QWEN1_VARIANT
    }

    fn key(&self) -> &'static str {
        "qwen1"
    }

    fn config_aliases(&self) -> &'static [(&'static str, &'static str)] {
        ALIASES
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = &QWEN1_VARIANT;
        // The original reads neither: a value would be silently ignored by it.
        if cfg.rope_scaling.is_some() || cfg.rope_parameters.is_some() {
            return Err(unsupported(v, "QWen's code reads no `rope_scaling` (its long-context settings are `use_dynamic_ntk` and `use_logn_attn`)"));
        }
        if cfg.hidden_act.is_some() {
            return Err(unsupported(
                v,
                "QWen's code reads no `hidden_act` (its MLP is SwiGLU)",
            ));
        }
        let mut r = Resolver::new(v, cfg, gen);
        let flag = |r: &mut Resolver<'_>, key: &str, default: bool| -> Result<bool> {
            Ok(r.take_or(key, Some(default))?.unwrap_or(default))
        };
        // QWenConfig's defaults.
        let ntk = flag(&mut r, "use_dynamic_ntk", true)?;
        let logn = flag(&mut r, "use_logn_attn", true)?;
        let no_bias = flag(&mut r, "no_bias", true)?;
        for key in ["use_cache_quantization", "use_cache_kernel"] {
            if flag(&mut r, key, false)? {
                return Err(unsupported(v, format!("`{key}` true is not supported")));
            }
        }
        if !flag(&mut r, "scale_attn_weights", true)? {
            return Err(unsupported(
                v,
                "`scale_attn_weights` false is not supported",
            ));
        }
        let seq_length: Option<usize> = r.take("seq_length")?;
        // The precision the original loads in (its config has no torch_dtype); all false: it
        // picks one by device (f32 on CPU), as rabbitllm's default does without a dtype.
        let mut precision = None;
        for (key, dtype) in [
            ("bf16", "bfloat16"),
            ("fp16", "float16"),
            ("fp32", "float32"),
        ] {
            if flag(&mut r, key, false)? {
                if precision.is_some() {
                    return Err(unsupported(
                        v,
                        "more than one of `bf16`, `fp16`, `fp32` is true",
                    ));
                }
                precision = Some(dtype);
            }
        }
        let mut spec = r.base()?;
        // Its rotary cache grows with the sequence (`update_rotary_pos_emb_cache`).
        spec.unbounded_positions = true;
        if spec.storage_dtype.is_none() {
            spec.storage_dtype = precision.map(str::to_string);
        }
        // `apply_rotary_pos_emb`: `t.float()` times the f32 tables, then `type_as(t)`.
        spec.rope.rotate_f32 = true;
        if ntk || logn {
            let n = seq_length.filter(|&n| n > 1).ok_or_else(|| {
                unsupported(
                    v,
                    "`use_dynamic_ntk`/`use_logn_attn` need `seq_length` (an integer above 1)",
                )
            })?;
            if ntk {
                if spec.rope.dim <= 2 {
                    // `ntk_alpha ** (dim / (dim - 2))`: the original divides by zero.
                    return Err(unsupported(
                        v,
                        format!("`use_dynamic_ntk` with a rotary width of {} (kv_channels × rotary_pct) is not something the original can run", spec.rope.dim),
                    ));
                }
                spec.rope.scaling = RopeScaling::QwenNtk { seq_length: n };
            }
            if logn {
                spec.attention.logn_length = Some(n);
            }
        }
        let (h, q) = (spec.hidden_size, spec.q_dim());
        if q != h {
            // The original's `c_proj` is `Linear(hidden_size, projection_size)`, applied to the
            // attention output: it only works when the two agree.
            return Err(unsupported(
                v,
                format!(
                    "`kv_channels` × `num_attention_heads` ({q}) must equal `hidden_size` ({h})"
                ),
            ));
        }
        if spec.num_kv_heads != spec.num_heads {
            return Err(unsupported(
                v,
                "QWen has no grouped keys (`num_key_value_heads`)",
            ));
        }
        if !spec.intermediate_size.is_multiple_of(2) {
            return Err(unsupported(
                v,
                format!(
                    "`intermediate_size` {} must be even (w1 and w2 get half each)",
                    spec.intermediate_size
                ),
            ));
        }
        spec.intermediate_size /= 2;
        let (m, b) = (spec.intermediate_size, !no_bias);
        spec.tensors = TensorLayout {
            embed: "transformer.wte".into(),
            final_norm: "transformer.ln_f".into(),
            final_norm_bias: false,
            lm_head: "lm_head".into(),
            lm_head_bias: false,
            layer_prefix: "transformer.h.".into(),
            layer: vec![
                Param::norm(Role::AttnNorm, "ln_1", h, false),
                // `c_attn` always has a bias; `no_bias` is about the others.
                Param::linear(Role::Qkv, "attn.c_attn", 3 * q, h, true),
                Param::linear(Role::O, "attn.c_proj", h, q, b),
                Param::norm(Role::MlpNorm, "ln_2", h, false),
                Param::linear(Role::Up, "mlp.w1", m, h, b),
                Param::linear(Role::Gate, "mlp.w2", m, h, b),
                Param::linear(Role::Down, "mlp.c_proj", h, m, b),
            ],
            dense_layer: vec![],
            aliases: vec![],
            ignored_prefixes: vec![],
        };
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        match json!({
            "kv_channels": s.head_dim,
            "no_bias": true,
            "rotary_pct": 1.0,
            "scale_attn_weights": true,
            "use_dynamic_ntk": true,
            "use_logn_attn": true,
            "use_flash_attn": "auto",
            "bf16": false,
            "fp16": false,
            "fp32": false,
            "emb_dropout_prob": 0.0,
            "attn_dropout_prob": 0.0,
            "tokenizer_class": "QWenTokenizer",
            "auto_map": {
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"
            },
            "hidden_act": null,
            "num_key_value_heads": null,
            "rope_scaling": null,
            "attention_dropout": null,
        }) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    fn synth_finish(&self, cfg: &mut Map<String, Value>) {
        // The original's context for NTK/log-n is `seq_length`; its `max_position_embeddings`
        // (32768 in the real configs) is never read.
        if let Some(n) = cfg.get("max_position_embeddings").cloned() {
            cfg.entry("seq_length").or_insert(n);
        }
        // The synthetic MLP width is per projection; QWen counts w1 and w2 together.
        if let Some(m) = cfg.get("intermediate_size").and_then(Value::as_u64) {
            cfg.insert("intermediate_size".into(), json!(2 * m));
        }
        crate::arch::unalias(cfg, ALIASES);
    }
}
