//! The resolved, unambiguous description of a model that the executor runs: every default
//! applied, every field cross-checked. Built by [`crate::Architecture::spec`].

use rabbit_split::layout::{Layout, RowOrder, UnitKind, UnitSpec};
use serde::{Deserialize, Serialize};

use crate::blocks::{Activation, AttentionSpec, LayerProgram, Norm, Param, Role, TensorLayout};
use crate::mla::{KvShape, MlaSpec};
use crate::moe::MoeSpec;
use crate::rope::{RopeScaling, RopeSpec};

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
    /// The norm every norm of the model uses.
    pub norm: Norm,
    /// MLP activation.
    pub activation: Activation,
    /// How a layer wires its blocks.
    pub program: LayerProgram,
    /// Attention score scale and soft-capping.
    pub attention: AttentionSpec,
    /// Rotary embedding (of every layer, or of the full-attention layers when `local_rope` is
    /// set).
    pub rope: RopeSpec,
    /// Rotary embedding of the sliding-window layers when it differs (Gemma 3's local base).
    pub local_rope: Option<RopeSpec>,
    /// Context limit.
    pub max_position_embeddings: usize,
    /// LM head shares the embedding.
    pub tie_word_embeddings: bool,
    /// Storage dtype named by config.json (`bfloat16`, `float16`, `float32`), if any.
    pub storage_dtype: Option<String>,
    /// Per layer: `Some(w)` = keys older than `w` positions are masked out.
    pub sliding_windows: Vec<Option<usize>>,
    /// Embeddings are multiplied by this, rounded to the compute dtype first (Gemma:
    /// `sqrt(hidden_size)`).
    pub embed_scale: Option<f64>,
    /// `tanh(logits / cap) * cap` on the LM head's output (Gemma 2).
    pub final_logit_softcap: Option<f64>,
    /// Baichuan 2's NormHead: every row of the LM head is divided by its L2 norm (at least
    /// 1e-12) before use.
    #[serde(default)]
    pub lm_head_norm: bool,
    /// The family's original code grows its position tables past `max_position_embeddings`
    /// (InternLM, InternLM2, Baichuan, QWen v1): that length is no limit.
    #[serde(default)]
    pub unbounded_positions: bool,
    /// Every tensor name and shape of the checkpoint.
    pub tensors: TensorLayout,
    /// A mixture of experts: the sparse layers' feed-forward block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeSpec>,
    /// Multi-head latent attention (DeepSeek) instead of the q/k/v heads: the KV cache holds
    /// the latent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<MlaSpec>,
    /// FP8 (E4M3) weights with block scales, as DeepSeek-V3 and the Qwen3 FP8 releases ship
    /// them (`quantization_config.weight_block_size`, `[rows, cols]` per scale): a layer
    /// weight `W` may be stored in FP8 beside its `W_scale_inv` (f32 or bf16, one value per
    /// block) and is dequantized after it is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_block: Option<[usize; 2]>,
    /// The routed experts are stored as MXFP4 (`quant_method: mxfp4`, gpt-oss): packed E2M1
    /// pairs in `_blocks` tensors and one E8M0 exponent per 32 values in `_scales` tensors,
    /// dequantized after they are read. A family that cannot read them refuses the config.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mxfp4: bool,
    /// What the user should know about how this checkpoint is run (e.g. parts not used).
    #[serde(default)]
    pub notes: Vec<String>,
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

    /// The longest sequence the model runs as its original code does: `max_position_embeddings`,
    /// or `None` where positions past it are part of the design (dynamic NTK, QWen's NTK, ALiBi,
    /// and families whose original code grows its tables instead of stopping).
    pub fn context_limit(&self) -> Option<usize> {
        let extrapolates = self.unbounded_positions
            || self.attention.alibi
            || matches!(
                self.rope.scaling,
                RopeScaling::Dynamic { .. } | RopeScaling::QwenNtk { .. }
            );
        (!extrapolates).then_some(self.max_position_embeddings)
    }

    /// Whether every layer has a parameter of this role (all layers share one inventory).
    pub fn has(&self, role: Role) -> bool {
        self.tensors.has(role)
    }

    /// Whether layer `i`'s feed-forward block is a mixture of experts.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.is_sparse(i))
    }

    /// The parameters of decoder layer `i` (a mixture's sparse and dense layers differ).
    pub fn layer_params(&self, i: usize) -> &[Param] {
        self.tensors.params(self.is_sparse(i))
    }

    /// Elements of layer `i`'s tensors outside its routed experts, and of one routed expert
    /// (0 for a dense layer).
    pub fn layer_elements(&self, i: usize) -> (u64, u64) {
        let (mut dense, mut expert) = (0u64, 0u64);
        for q in self.layer_params(i) {
            let n = q.shape.iter().product::<usize>() as u64
                + if q.bias { q.shape[0] as u64 } else { 0 };
            match q.expert {
                Some(0) => expert += n,
                Some(_) => {}
                None => dense += n,
            }
        }
        (dense, expert)
    }

    /// What the KV cache holds per token and layer: keys and values of every KV head, or the
    /// latent attention's compressed latent and rope key.
    pub fn kv_shape(&self) -> KvShape {
        match &self.mla {
            Some(m) => m.kv_shape(),
            None => KvShape {
                heads: self.num_kv_heads,
                key_dim: self.head_dim,
                value_dim: self.head_dim,
            },
        }
    }

    /// Values the KV cache holds per token and layer.
    pub fn kv_values_per_token(&self) -> usize {
        self.kv_shape().values()
    }

    /// The full names of routed expert `e`'s tensors in layer `i` (none for a dense layer), and
    /// of the FP8 block scales its checkpoint may store beside them.
    pub fn expert_tensors(&self, i: usize, e: usize) -> Vec<String> {
        let p = self.tensors.prefix(i);
        let mut out = vec![];
        for q in self.layer_params(i).iter().filter(|q| q.expert == Some(e)) {
            let name = q.weight_name(&p);
            if self.fp8_block.is_some() {
                out.push(format!("{name}_scale_inv"));
            }
            out.push(name);
        }
        out
    }

    /// Every tensor a checkpoint of this model holds, with its shape, in execution order
    /// (embedding, layers, final norm, lm_head when untied).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let t = &self.tensors;
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut out = vec![(t.embed_weight(), vec![v, h])];
        for i in 0..self.num_layers {
            out.extend(self.layer_tensor_shapes(i));
        }
        out.extend(self.final_norm_shapes());
        out.extend(self.lm_head_shapes());
        out
    }

    /// The final norm's tensors, and a tied LM head's own bias (it has no unit of its own).
    fn final_norm_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let t = &self.tensors;
        let mut out = vec![(t.final_norm_weight(), vec![self.hidden_size])];
        if t.final_norm_bias {
            out.push((format!("{}.bias", t.final_norm), vec![self.hidden_size]));
        }
        if self.tie_word_embeddings && t.lm_head_bias {
            out.push((format!("{}.bias", t.lm_head), vec![self.vocab_size]));
        }
        out
    }

    /// The LM head's tensors (none when tied).
    fn lm_head_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let t = &self.tensors;
        let mut out = vec![];
        if !self.tie_word_embeddings {
            out.push((t.lm_head_weight(), vec![self.vocab_size, self.hidden_size]));
            if t.lm_head_bias {
                out.push((format!("{}.bias", t.lm_head), vec![self.vocab_size]));
            }
        }
        out
    }

    /// The tensors of decoder layer `i` with their shapes.
    pub fn layer_tensor_shapes(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let p = self.tensors.prefix(i);
        let mut out = vec![];
        for param in self.layer_params(i) {
            out.push((param.weight_name(&p), param.shape.clone()));
            if param.bias {
                out.push((format!("{p}{}.bias", param.name), vec![param.shape[0]]));
            }
        }
        out
    }

    /// The split layout: which tensors go into which unit file.
    pub fn layout(&self) -> Layout {
        let names_of = |v: Vec<(String, Vec<usize>)>| v.into_iter().map(|(n, _)| n).collect();
        let t = &self.tensors;
        let mut units = vec![UnitSpec {
            name: "embed".into(),
            kind: UnitKind::Embedding,
            required: vec![t.embed_weight()],
            optional: vec![],
        }];
        for i in 0..self.num_layers {
            units.push(UnitSpec {
                name: format!("layer.{i:03}"),
                kind: UnitKind::Layer(i),
                required: names_of(self.layer_tensor_shapes(i)),
                optional: names_of(self.layer_scale_shapes(i)),
            });
        }
        units.push(UnitSpec {
            name: "norm".into(),
            kind: UnitKind::FinalNorm,
            required: names_of(self.final_norm_shapes()),
            optional: vec![],
        });
        let mut ignored_suffixes = vec!["rotary_emb.inv_freq".to_string()];
        if self.tie_word_embeddings {
            ignored_suffixes.push(t.lm_head_weight());
        } else {
            units.push(UnitSpec {
                name: "lm_head".into(),
                kind: UnitKind::LmHead,
                required: names_of(self.lm_head_shapes()),
                optional: vec![],
            });
        }
        let (stacked, stacked_shapes): (Vec<_>, Vec<_>) = self
            .stacked()
            .into_iter()
            .map(|(s, shape)| {
                let name = s.tensor.clone();
                (s, (name, shape))
            })
            .unzip();
        Layout {
            architecture: self.architecture.clone(),
            units,
            tied_lm_head: self.tie_word_embeddings,
            ignored_suffixes,
            ignored_prefixes: t.ignored_prefixes.clone(),
            aliases: t.aliases.clone(),
            row_orders: self.row_orders(),
            shapes: self
                .tensor_shapes()
                .into_iter()
                .chain((0..self.num_layers).flat_map(|i| self.layer_scale_shapes(i)))
                .chain(stacked_shapes)
                .collect(),
            groups: self.expert_groups(),
            uncompressed: self.routers(),
            stacked,
        }
    }

    /// The block scales an FP8 checkpoint may store beside layer `i`'s projection weights
    /// (`{weight}_scale_inv`, one value per `fp8_block` block, partial blocks rounded up).
    pub fn layer_scale_shapes(&self, i: usize) -> Vec<(String, Vec<usize>)> {
        let Some([bm, bn]) = self.fp8_block else {
            return vec![];
        };
        let p = self.tensors.prefix(i);
        self.layer_params(i)
            .iter()
            .filter(|q| q.shape.len() == 2 && !q.raw)
            .map(|q| {
                let scale = vec![q.shape[0].div_ceil(bm), q.shape[1].div_ceil(bn)];
                (format!("{}_scale_inv", q.weight_name(&p)), scale)
            })
            .collect()
    }

    /// Routed expert `e`'s tensors (and their FP8 scales) form group `e + 1` of their layer's
    /// file (the rest, group 0, comes first).
    fn expert_groups(&self) -> std::collections::BTreeMap<String, u32> {
        let mut out = std::collections::BTreeMap::new();
        for i in 0..self.num_layers {
            let p = self.tensors.prefix(i);
            for q in self.layer_params(i) {
                if let Some(e) = q.expert {
                    let name = q.weight_name(&p);
                    if self.fp8_block.is_some() {
                        out.insert(format!("{name}_scale_inv"), e as u32 + 1);
                    }
                    out.insert(name, e as u32 + 1);
                }
            }
        }
        out
    }

    /// The checkpoint tensors stacking one part per routed expert, with their parts in order,
    /// and each one's shape (the expert count, then a part's shape).
    fn stacked(&self) -> Vec<(rabbit_split::layout::Stacked, Vec<usize>)> {
        let mut out = vec![];
        for i in 0..self.num_layers {
            let p = self.tensors.prefix(i);
            // A layer's own few stacked tensors: its parts are found among them.
            let mut layer: Vec<(rabbit_split::layout::Stacked, Vec<usize>)> = vec![];
            for q in self.layer_params(i) {
                let Some(source) = q.stacked_source(&p) else {
                    continue;
                };
                match layer.iter_mut().find(|(s, _)| s.tensor == source) {
                    Some((s, shape)) => {
                        s.parts.push(q.weight_name(&p));
                        shape[0] += 1;
                    }
                    None => layer.push((
                        rabbit_split::layout::Stacked {
                            tensor: source,
                            parts: vec![q.weight_name(&p)],
                        },
                        std::iter::once(1).chain(q.shape.iter().copied()).collect(),
                    )),
                }
            }
            out.extend(layer);
        }
        out
    }

    /// The routers' weights (and the shared expert's sigmoid gate): never compressed.
    fn routers(&self) -> Vec<String> {
        let mut out = vec![];
        for i in 0..self.num_layers {
            let p = self.tensors.prefix(i);
            for q in self.layer_params(i) {
                if matches!(q.role, Role::Router | Role::SharedExpertGate) {
                    out.push(q.weight_name(&p));
                }
            }
        }
        out
    }

    /// The regrouped tensors of every layer (weights and their biases).
    fn row_orders(&self) -> Vec<RowOrder> {
        let mut out = vec![];
        for i in 0..self.num_layers {
            let p = self.tensors.prefix(i);
            for param in self.layer_params(i) {
                let Some(order) = &param.row_order else {
                    continue;
                };
                let mut push = |suffix: &str| {
                    out.push(RowOrder {
                        tensor: format!("{p}{}.{suffix}", param.name),
                        order: order.clone(),
                    })
                };
                push("weight");
                if param.bias {
                    push("bias");
                }
            }
        }
        out
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn num_parameters(&self) -> u64 {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}
