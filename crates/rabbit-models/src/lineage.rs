//! The Llama lineage (Llama, Mistral, Qwen2, Qwen3): one pre-norm layer program over separate
//! q/k/v/o and gate/up/down projections; the families differ only in biases, q/k norm, defaults
//! and sliding-window rules, which each family file states as a [`LlamaLineage`] value.

use serde_json::Value;

use crate::arch::{Architecture, SynthShape, Variant};
use crate::blocks::{Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

/// Whether a projection carries a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// Always (Qwen2's q/k/v).
    Always,
    /// Never.
    Never,
    /// As config.json's `attention_bias` says (default false).
    AttentionBiasField,
    /// As config.json's `mlp_bias` says (default false).
    MlpBiasField,
}

impl Bias {
    fn resolve(self, cfg: &HfConfig) -> bool {
        match self {
            Bias::Always => true,
            Bias::Never => false,
            Bias::AttentionBiasField => cfg.attention_bias.unwrap_or(false),
            Bias::MlpBiasField => cfg.mlp_bias.unwrap_or(false),
        }
    }
}

/// One family of the Llama lineage.
pub struct LlamaLineage {
    /// Config resolution.
    pub variant: &'static Variant,
    /// `rabbit synth --arch` key.
    pub key: &'static str,
    /// Bias on q/k/v.
    pub qkv_bias: Bias,
    /// Bias on o_proj.
    pub o_bias: Bias,
    /// Bias on the MLP.
    pub mlp_bias: Bias,
    /// Per-head q/k RMSNorm before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Family-specific keys of a synthetic config.json.
    pub synth: fn(&SynthShape) -> Value,
}

/// The separate q/k/v/o projections of the Llama lineage (also its mixtures of experts').
pub fn attention_projections(spec: &ModelSpec, qkv_bias: bool, o_bias: bool) -> Vec<Param> {
    let (h, q, kv) = (spec.hidden_size, spec.q_dim(), spec.kv_dim());
    vec![
        Param::linear(Role::Q, "self_attn.q_proj", q, h, qkv_bias),
        Param::linear(Role::K, "self_attn.k_proj", kv, h, qkv_bias),
        Param::linear(Role::V, "self_attn.v_proj", kv, h, qkv_bias),
        Param::linear(Role::O, "self_attn.o_proj", h, q, o_bias),
    ]
}

/// The separate-projection layer of the Llama lineage (also Gemma's, with other norms).
pub fn separate_projections(
    spec: &ModelSpec,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
) -> Vec<Param> {
    let (h, m) = (spec.hidden_size, spec.intermediate_size);
    let mut out = attention_projections(spec, qkv_bias, o_bias);
    out.extend([
        Param::linear(Role::Gate, "mlp.gate_proj", m, h, mlp_bias),
        Param::linear(Role::Up, "mlp.up_proj", m, h, mlp_bias),
        Param::linear(Role::Down, "mlp.down_proj", h, m, mlp_bias),
    ]);
    out
}

impl Architecture for LlamaLineage {
    fn variant(&self) -> &'static Variant {
        self.variant
    }

    fn key(&self) -> &'static str {
        self.key
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let mut spec = Resolver::new(self.variant, cfg, gen).base()?;
        let h = spec.hidden_size;
        let mut layer = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
        layer.extend(separate_projections(
            &spec,
            self.qkv_bias.resolve(cfg),
            self.o_bias.resolve(cfg),
            self.mlp_bias.resolve(cfg),
        ));
        if self.qk_norm {
            let d = spec.head_dim;
            layer.push(Param::norm(Role::QNorm, "self_attn.q_norm", d, false));
            layer.push(Param::norm(Role::KNorm, "self_attn.k_norm", d, false));
        }
        layer.push(Param::norm(
            Role::MlpNorm,
            "post_attention_layernorm",
            h,
            false,
        ));
        spec.tensors = TensorLayout::llama_names(layer);
        Ok(spec)
    }

    fn synth_config(&self, shape: &SynthShape) -> Option<serde_json::Map<String, Value>> {
        match (self.synth)(shape) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
}
