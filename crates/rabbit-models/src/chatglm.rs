//! ChatGLM2 / ChatGLM3 (and GLM-4 checkpoints with the original remote code): `ChatGLMModel`
//! with its own config key names, one fused `query_key_value` projection (multi-query groups),
//! rotary on the first half of each head in interleaved pairs, RMSNorm whose weight multiplies
//! in f32, and a fused SwiGLU `dense_h_to_4h`. The original code runs sequence-first; that is
//! only a memory layout, the numbers are the same.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, NormKind, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::resolve::Resolver;
use crate::rope::RopeScaling;
use crate::spec::ModelSpec;

static CHATGLM_VARIANT: Variant = Variant {
    name: "ChatGLMModel",
    model_type: "chatglm",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-5,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: Some(0.5),
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &[
        "hidden_dropout",
        "classifier_dropout",
        "bias_dropout_fusion",
        // Only the torch < 2 attention path reads it, where it cancels out.
        "apply_query_key_layer_scaling",
        // The torch >= 2 path (SDPA) ignores it.
        "attention_softmax_in_fp32",
        "prefix_projection",
    ],
};

/// `ChatGLMModel` (also `ChatGLMForConditionalGeneration` in `architectures`).
pub struct ChatGlm;

/// ChatGLM's config key names for the common keys (`configuration_chatglm.py`).
const ALIASES: &[(&str, &str)] = &[
    ("num_layers", "num_hidden_layers"),
    ("padded_vocab_size", "vocab_size"),
    ("ffn_hidden_size", "intermediate_size"),
    ("kv_channels", "head_dim"),
    ("seq_length", "max_position_embeddings"),
    ("layernorm_epsilon", "rms_norm_eps"),
];

fn flag(r: &mut Resolver<'_>, key: &str, default: bool) -> Result<bool> {
    Ok(r.take_or(key, Some(default))?.unwrap_or(default))
}

impl Architecture for ChatGlm {
    fn variant(&self) -> &'static Variant {
        &CHATGLM_VARIANT
    }

    fn other_names(&self) -> &'static [&'static str] {
        &["ChatGLMForConditionalGeneration"]
    }

    fn key(&self) -> &'static str {
        "chatglm"
    }

    fn config_aliases(&self) -> &'static [(&'static str, &'static str)] {
        ALIASES
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = &CHATGLM_VARIANT;
        let mut r = Resolver::new(v, cfg, gen);
        // Defaults are those of ChatGLMConfig.
        let mqa = flag(&mut r, "multi_query_attention", false)?;
        let groups: usize = r.take_or("multi_query_group_num", Some(1))?.unwrap_or(1);
        let qkv_bias = flag(&mut r, "add_qkv_bias", false)?;
        let linear_bias = flag(&mut r, "add_bias_linear", false)?;
        let rmsnorm = flag(&mut r, "rmsnorm", true)?;
        let refuse = |key: &str, why: &str| unsupported(v, format!("`{key}` {why}"));
        if !flag(&mut r, "post_layer_norm", true)? {
            return Err(refuse(
                "post_layer_norm",
                "false (no final norm) is not supported",
            ));
        }
        if flag(&mut r, "apply_residual_connection_post_layernorm", false)? {
            return Err(refuse(
                "apply_residual_connection_post_layernorm",
                "true is not supported",
            ));
        }
        if flag(&mut r, "fp32_residual_connection", false)? {
            return Err(refuse("fp32_residual_connection", "true is not supported"));
        }
        if !flag(&mut r, "original_rope", true)? {
            return Err(refuse(
                "original_rope",
                "false is not supported (the original code has only the original rotary)",
            ));
        }
        if let Some(bits) = r.take::<u32>("quantization_bit")? {
            if bits != 0 {
                return Err(refuse(
                    "quantization_bit",
                    &format!("{bits}: pre-quantized ChatGLM checkpoints are not supported (use the unquantized one and `--compression`)"),
                ));
            }
        }
        if let Some(n) = r.take::<Value>("pre_seq_len")? {
            return Err(refuse(
                "pre_seq_len",
                &format!("{n}: P-tuning prefix checkpoints are not supported"),
            ));
        }
        let rope_ratio: f64 = r.take_or("rope_ratio", Some(1.0))?.unwrap_or(1.0);
        if !(rope_ratio > 0.0 && rope_ratio.is_finite()) {
            return Err(refuse("rope_ratio", "must be a positive number"));
        }
        if cfg.rope_theta.is_some() || cfg.rope_scaling.is_some() || cfg.rope_parameters.is_some() {
            return Err(unsupported(
                v,
                "ChatGLM's code reads no `rope_theta`/`rope_scaling` (its base is 10000 × `rope_ratio`)",
            ));
        }
        if cfg.hidden_act.is_some() {
            return Err(refuse(
                "hidden_act",
                "is not read by ChatGLM's code (its MLP is SwiGLU)",
            ));
        }
        if cfg.max_position_embeddings.is_none() {
            r.set_max_positions(2048);
        }
        if mqa {
            if groups == 0 || !cfg.num_attention_heads.is_multiple_of(groups) {
                return Err(refuse(
                    "multi_query_group_num",
                    &format!(
                        "({groups}) must divide `num_attention_heads` ({})",
                        cfg.num_attention_heads
                    ),
                ));
            }
            r.set_kv_heads(groups);
        } else if cfg.num_key_value_heads.is_some() {
            return Err(unsupported(
                v,
                "`num_key_value_heads` is not a ChatGLM key (use `multi_query_group_num`)",
            ));
        }
        let name = cfg
            .extra
            .get("_name_or_path")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut spec = r.base()?;
        if rope_ratio != 1.0 {
            // One key, two meanings: chatglm2-6b-32k's code divides the positions by it,
            // chatglm3-6b-32k's and glm-4's multiply the base. Only the checkpoint's name
            // tells them apart; say which was used.
            if name.contains("chatglm2") {
                spec.rope.scaling = RopeScaling::Linear { factor: rope_ratio };
                spec.notes.push(format!(
                    "rope_ratio {rope_ratio} divides the positions (ChatGLM2-32k's code; `_name_or_path` names chatglm2)"
                ));
            } else {
                spec.rope.theta = 10000.0 * rope_ratio;
                spec.notes.push(format!(
                    "rope_ratio {rope_ratio} multiplies the rotary base (ChatGLM3-32k / GLM-4 code; ChatGLM2-32k checkpoints are recognised by a `_name_or_path` naming chatglm2)"
                ));
            }
        } else {
            spec.rope.theta = 10000.0;
        }
        spec.rope.interleaved = true;
        // The original RMSNorm multiplies its weight in f32, then casts.
        spec.norm.kind = if rmsnorm {
            NormKind::RmsWeightF32
        } else {
            NormKind::Layer
        };
        // ChatGLMForConditionalGeneration has no tying: `output_layer` is always its own.
        spec.tie_word_embeddings = false;
        let (h, q, kv, m, d) = (
            spec.hidden_size,
            spec.q_dim(),
            spec.kv_dim(),
            spec.intermediate_size,
            spec.head_dim,
        );
        // `bias=config.add_bias_linear or config.add_qkv_bias` in the original.
        let mut qkv = Param::linear(
            Role::Qkv,
            "self_attention.query_key_value",
            q + 2 * kv,
            h,
            qkv_bias || linear_bias,
        );
        if !mqa {
            // Without multi-query groups the rows are packed per head, `[q_h; k_h; v_h]` for
            // each head h: the split regroups them into `[q; k; v]`.
            let heads = spec.num_heads;
            qkv.row_order = Some(
                (0..3)
                    .flat_map(|part| (0..heads).map(move |hd| hd * 3 + part))
                    .collect(),
            );
            debug_assert_eq!(q + 2 * kv, 3 * heads * d);
        }
        let norm_bias = !rmsnorm;
        spec.tensors = TensorLayout {
            embed: "transformer.embedding.word_embeddings".into(),
            final_norm: "transformer.encoder.final_layernorm".into(),
            final_norm_bias: norm_bias,
            lm_head: "transformer.output_layer".into(),
            lm_head_bias: false,
            layer_prefix: "transformer.encoder.layers.".into(),
            layer: vec![
                Param::norm(Role::AttnNorm, "input_layernorm", h, norm_bias),
                qkv,
                Param::linear(Role::O, "self_attention.dense", h, q, linear_bias),
                Param::norm(Role::MlpNorm, "post_attention_layernorm", h, norm_bias),
                Param::linear(Role::GateUp, "mlp.dense_h_to_4h", 2 * m, h, linear_bias),
                Param::linear(Role::Down, "mlp.dense_4h_to_h", h, m, linear_bias),
            ],
            dense_layer: vec![],
            aliases: vec![],
            // A persistent buffer of the original (its values are recomputed, never read).
            ignored_prefixes: vec!["transformer.rotary_pos_emb.".into()],
        };
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        match json!({
            "kv_channels": s.head_dim,
            "add_bias_linear": false,
            "add_qkv_bias": true,
            "apply_query_key_layer_scaling": true,
            "apply_residual_connection_post_layernorm": false,
            "attention_softmax_in_fp32": true,
            "bias_dropout_fusion": true,
            "fp32_residual_connection": false,
            "hidden_dropout": 0.0,
            "multi_query_attention": true,
            "original_rope": true,
            "post_layer_norm": true,
            "rmsnorm": true,
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"
            },
            // Keys the synthetic writer adds that ChatGLM's config does not have.
            "hidden_act": null,
            "rope_theta": null,
            "rope_scaling": null,
            "initializer_range": null,
            "bos_token_id": null,
        }) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    fn synth_finish(&self, cfg: &mut Map<String, Value>) {
        crate::arch::unalias(cfg, ALIASES);
        if let Some(kv) = cfg.remove("num_key_value_heads") {
            cfg.insert("multi_query_group_num".into(), kv);
        }
    }
}
