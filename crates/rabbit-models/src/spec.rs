//! The resolved, unambiguous description of a model that the executor runs: every default
//! applied, every field cross-checked. Built by [`crate::Architecture::spec`].

use rabbit_split::layout::{Layout, UnitKind, UnitSpec};
use serde::{Deserialize, Serialize};

use crate::rope::RopeSpec;

/// HF tensor names of the Llama-lineage families (Qwen2, Qwen3, Llama, Mistral share them).
pub mod names {
    /// Token embedding.
    pub const EMBED: &str = "model.embed_tokens.weight";
    /// Final RMSNorm.
    pub const FINAL_NORM: &str = "model.norm.weight";
    /// Output projection.
    pub const LM_HEAD: &str = "lm_head.weight";
    /// Pre-attention RMSNorm (relative to the layer prefix).
    pub const INPUT_NORM: &str = "input_layernorm.weight";
    /// Pre-MLP RMSNorm.
    pub const POST_ATTN_NORM: &str = "post_attention_layernorm.weight";
    /// Query projection.
    pub const Q_PROJ: &str = "self_attn.q_proj";
    /// Key projection.
    pub const K_PROJ: &str = "self_attn.k_proj";
    /// Value projection.
    pub const V_PROJ: &str = "self_attn.v_proj";
    /// Output projection of attention.
    pub const O_PROJ: &str = "self_attn.o_proj";
    /// Per-head query RMSNorm (Qwen3).
    pub const Q_NORM: &str = "self_attn.q_norm.weight";
    /// Per-head key RMSNorm (Qwen3).
    pub const K_NORM: &str = "self_attn.k_norm.weight";
    /// MLP gate projection.
    pub const GATE_PROJ: &str = "mlp.gate_proj";
    /// MLP up projection.
    pub const UP_PROJ: &str = "mlp.up_proj";
    /// MLP down projection.
    pub const DOWN_PROJ: &str = "mlp.down_proj";

    /// `model.layers.{i}.`
    pub fn layer_prefix(i: usize) -> String {
        format!("model.layers.{i}.")
    }
}

/// Sampling defaults from generation_config.json (used when the caller does not override).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationDefaults {
    /// Sample instead of greedy.
    pub do_sample: Option<bool>,
    /// Temperature.
    pub temperature: Option<f64>,
    /// Top-k.
    pub top_k: Option<usize>,
    /// Top-p.
    pub top_p: Option<f64>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f64>,
}

/// A fully resolved decoder-only model description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// `architectures[0]`.
    pub architecture: String,
    /// Embedding / LM-head rows.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width (explicit in config or the family default; never forced to hidden/heads
    /// when the config gives it).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: RopeSpec,
    /// Context limit.
    pub max_position_embeddings: usize,
    /// LM head shares the embedding.
    pub tie_word_embeddings: bool,
    /// Storage dtype named by config.json (`bfloat16`, `float16`, `float32`), if any.
    pub storage_dtype: Option<String>,
    /// Per layer: `Some(w)` = keys older than `w` positions are masked out.
    pub sliding_windows: Vec<Option<usize>>,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on MLP projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Stop ids (generation_config.json wins over config.json).
    pub eos_token_ids: Vec<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Sampling defaults.
    pub generation: GenerationDefaults,
}

impl ModelSpec {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Every tensor a checkpoint of this model holds, with its shape, in execution order
    /// (embedding, layers, final norm, lm_head when untied).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![(
            names::EMBED.to_string(),
            vec![self.vocab_size, self.hidden_size],
        )];
        for i in 0..self.num_layers {
            out.extend(self.layer_tensor_shapes(i));
        }
        out.push((names::FINAL_NORM.to_string(), vec![self.hidden_size]));
        if !self.tie_word_embeddings {
            out.push((
                names::LM_HEAD.to_string(),
                vec![self.vocab_size, self.hidden_size],
            ));
        }
        out
    }

    /// The tensors of decoder layer `i` with their shapes.
    pub fn layer_tensor_shapes(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let p = names::layer_prefix(i);
        let (h, q, kv, m) = (
            self.hidden_size,
            self.q_dim(),
            self.kv_dim(),
            self.intermediate_size,
        );
        let mut out = vec![(format!("{p}{}", names::INPUT_NORM), vec![h])];
        let mut linear = |name: &str, rows: usize, cols: usize, bias: bool| {
            out.push((format!("{p}{name}.weight"), vec![rows, cols]));
            if bias {
                out.push((format!("{p}{name}.bias"), vec![rows]));
            }
        };
        linear(names::Q_PROJ, q, h, self.qkv_bias);
        linear(names::K_PROJ, kv, h, self.qkv_bias);
        linear(names::V_PROJ, kv, h, self.qkv_bias);
        linear(names::O_PROJ, h, q, self.o_bias);
        linear(names::GATE_PROJ, m, h, self.mlp_bias);
        linear(names::UP_PROJ, m, h, self.mlp_bias);
        linear(names::DOWN_PROJ, h, m, self.mlp_bias);
        if self.qk_norm {
            out.push((format!("{p}{}", names::Q_NORM), vec![self.head_dim]));
            out.push((format!("{p}{}", names::K_NORM), vec![self.head_dim]));
        }
        out.push((format!("{p}{}", names::POST_ATTN_NORM), vec![h]));
        out
    }

    /// The split layout: which tensors go into which unit file.
    pub fn layout(&self) -> Layout {
        let names_of = |v: Vec<(String, Vec<usize>)>| v.into_iter().map(|(n, _)| n).collect();
        let mut units = vec![UnitSpec {
            name: "embed".into(),
            kind: UnitKind::Embedding,
            required: vec![names::EMBED.into()],
            optional: vec![],
        }];
        for i in 0..self.num_layers {
            units.push(UnitSpec {
                name: format!("layer.{i:03}"),
                kind: UnitKind::Layer(i),
                required: names_of(self.layer_tensor_shapes(i)),
                optional: vec![],
            });
        }
        units.push(UnitSpec {
            name: "norm".into(),
            kind: UnitKind::FinalNorm,
            required: vec![names::FINAL_NORM.into()],
            optional: vec![],
        });
        let mut ignored_suffixes = vec!["rotary_emb.inv_freq".to_string()];
        if self.tie_word_embeddings {
            ignored_suffixes.push(names::LM_HEAD.into());
        } else {
            units.push(UnitSpec {
                name: "lm_head".into(),
                kind: UnitKind::LmHead,
                required: vec![names::LM_HEAD.into()],
                optional: vec![],
            });
        }
        Layout {
            architecture: self.architecture.clone(),
            units,
            tied_lm_head: self.tie_word_embeddings,
            ignored_suffixes,
        }
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn num_parameters(&self) -> u64 {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}
