//! InternLM (`InternLMForCausalLM`, v1: the Llama layer with biases on q/k/v/o) and InternLM2
//! (`InternLM2ForCausalLM`: its own tensor names, and `wqkv` packed per key/value group, which
//! the split regroups into plain `[q; k; v]`). Both from their original remote code.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::lineage::separate_projections;
use crate::resolve::Resolver;
use crate::rope::RopeScaling;
use crate::spec::ModelSpec;

static INTERNLM_VARIANT: Variant = Variant {
    name: "InternLMForCausalLM",
    model_type: "internlm",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &[],
};

static INTERNLM2_VARIANT: Variant = Variant {
    name: "InternLM2ForCausalLM",
    model_type: "internlm2",
    harmless_keys: &["attn_implementation"],
    ..INTERNLM_VARIANT
};

/// `InternLMForCausalLM` (InternLM v1).
pub struct InternLm;
/// `InternLM2ForCausalLM`.
pub struct InternLm2;

/// config.json `bias` (both config classes default to true).
fn bias(r: &mut Resolver<'_>) -> Result<bool> {
    Ok(r.take_or("bias", Some(true))?.unwrap_or(true))
}

/// The row order that turns InternLM2's `wqkv` (for each of `kv` groups: its `per` query heads,
/// then its key head, then its value head; blocks of one head) into `[q; k; v]`.
pub fn internlm2_qkv_order(heads: usize, kv: usize) -> Vec<usize> {
    let per = heads / kv;
    let gs = per + 2;
    let q = (0..kv).flat_map(|g| (0..per).map(move |j| g * gs + j));
    let k = (0..kv).map(|g| g * gs + per);
    let v = (0..kv).map(|g| g * gs + per + 1);
    q.chain(k).chain(v).collect()
}

impl Architecture for InternLm {
    fn variant(&self) -> &'static Variant {
        &INTERNLM_VARIANT
    }

    fn key(&self) -> &'static str {
        "internlm"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = &INTERNLM_VARIANT;
        let mut r = Resolver::new(v, cfg, gen);
        let bias = bias(&mut r)?;
        if let Some(tp) = r.take::<u64>("pretraining_tp")? {
            if tp != 1 {
                return Err(unsupported(
                    v,
                    format!("`pretraining_tp` {tp} is not supported"),
                ));
            }
        }
        let mut spec = r.base()?;
        // Its rotary cache grows past the configured length (`if seq_len > max_seq_len_cached`).
        spec.unbounded_positions = true;
        // The original code builds its rotary from the head size alone (base 10000) and has no
        // grouped keys: settings it would silently ignore are refused.
        if spec.rope != crate::rope::RopeSpec::plain(10000.0, spec.head_dim) {
            return Err(unsupported(
                v,
                "InternLM's code reads no `rope_theta`/`rope_scaling` (base 10000, no scaling); this config sets them",
            ));
        }
        if spec.num_kv_heads != spec.num_heads {
            return Err(unsupported(
                v,
                format!(
                    "`num_key_value_heads` {} differs from `num_attention_heads` {}: InternLM's code has no grouped keys",
                    spec.num_kv_heads, spec.num_heads
                ),
            ));
        }
        let h = spec.hidden_size;
        let mut layer = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
        layer.extend(separate_projections(&spec, bias, bias, false));
        layer.push(Param::norm(
            Role::MlpNorm,
            "post_attention_layernorm",
            h,
            false,
        ));
        spec.tensors = TensorLayout::llama_names(layer);
        Ok(spec)
    }

    fn synth_finish(&self, cfg: &mut Map<String, Value>) {
        // No grouped keys in InternLM v1 (its real configs repeat the head count).
        if let Some(h) = cfg.get("num_attention_heads").cloned() {
            cfg.insert("num_key_value_heads".into(), h);
        }
    }

    fn synth_config(&self, _: &SynthShape) -> Option<Map<String, Value>> {
        match json!({
            "bias": true,
            "auto_map": {
                "AutoConfig": "configuration_internlm.InternLMConfig",
                "AutoModel": "modeling_internlm.InternLMForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"
            },
        }) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}

impl Architecture for InternLm2 {
    fn variant(&self) -> &'static Variant {
        &INTERNLM2_VARIANT
    }

    fn key(&self) -> &'static str {
        "internlm2"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let mut r = Resolver::new(&INTERNLM2_VARIANT, cfg, gen);
        let bias = bias(&mut r)?;
        let mut spec = r.base()?;
        // Its rotary caches grow past the configured length, scaled or not.
        spec.unbounded_positions = true;
        // Its config check allows only these two, with a factor of at least 1.
        match &spec.rope.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } if *factor >= 1.0 => {}
            other => {
                return Err(unsupported(
                    &INTERNLM2_VARIANT,
                    format!("`rope_scaling` {other:?}: InternLM2's code runs only `linear` or `dynamic` with a factor of at least 1"),
                ))
            }
        }
        if cfg
            .rope_scaling
            .as_ref()
            .and_then(|s| s.get("factor"))
            .is_some_and(|f| !f.is_f64())
        {
            return Err(unsupported(
                &INTERNLM2_VARIANT,
                "`rope_scaling.factor` must be a float (InternLM2's config check refuses an integer such as `2`; write `2.0`)",
            ));
        }
        if cfg
            .rope_scaling
            .as_ref()
            .is_some_and(|s| !s.is_null() && s.get("type").is_none())
        {
            return Err(unsupported(
                &INTERNLM2_VARIANT,
                "`rope_scaling` needs `type` (InternLM2's code reads `rope_scaling[\"type\"]`)",
            ));
        }
        let (h, q, kv, m) = (
            spec.hidden_size,
            spec.q_dim(),
            spec.kv_dim(),
            spec.intermediate_size,
        );
        let mut wqkv = Param::linear(Role::Qkv, "attention.wqkv", q + 2 * kv, h, bias);
        wqkv.row_order = Some(internlm2_qkv_order(spec.num_heads, spec.num_kv_heads));
        spec.tensors = TensorLayout {
            embed: "model.tok_embeddings".into(),
            final_norm: "model.norm".into(),
            final_norm_bias: false,
            lm_head: "output".into(),
            lm_head_bias: false,
            layer_prefix: "model.layers.".into(),
            layer: vec![
                Param::norm(Role::AttnNorm, "attention_norm", h, false),
                wqkv,
                Param::linear(Role::O, "attention.wo", h, q, bias),
                Param::norm(Role::MlpNorm, "ffn_norm", h, false),
                Param::linear(Role::Gate, "feed_forward.w1", m, h, false),
                Param::linear(Role::Up, "feed_forward.w3", m, h, false),
                Param::linear(Role::Down, "feed_forward.w2", h, m, false),
            ],
            dense_layer: vec![],
            aliases: vec![],
            ignored_prefixes: vec![],
        };
        Ok(spec)
    }

    fn synth_config(&self, _: &SynthShape) -> Option<Map<String, Value>> {
        match json!({
            "bias": false,
            "attn_implementation": "eager",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"
            },
        }) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wqkv_order_regroups_each_group() {
        // 4 query heads in 2 groups: rows [q0 q1 k0 v0 | q2 q3 k1 v1].
        assert_eq!(internlm2_qkv_order(4, 2), vec![0, 1, 4, 5, 2, 6, 3, 7]);
        // Multi-head (one query per group): [q0 k0 v0 | q1 k1 v1].
        assert_eq!(internlm2_qkv_order(2, 2), vec![0, 3, 1, 4, 2, 5]);
    }
}
