//! The vocabulary a family uses to say what its decoder is made of: the norm, the activation, the
//! layer program (how the blocks are wired), and the role of every tensor of a layer. The
//! executor (rabbit-core) has one implementation of each; a family only picks.

use serde::{Deserialize, Serialize};

/// How hidden states are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// RMSNorm, transformers' Llama form: normalise in f32, cast to the compute dtype, then
    /// multiply by the weight.
    Rms,
    /// RMSNorm as ChatGLM writes it: normalise in f32, multiply by the weight in f32, then
    /// cast (identical to [`NormKind::Rms`] in f32; not in bf16/f16).
    RmsWeightF32,
    /// RMSNorm, Gemma's form: normalise in f32 and multiply by `1 + weight` in f32, then cast.
    /// (The `+1` is applied when the weights are bound, in f32, so bf16 weights lose nothing.)
    RmsOffset,
    /// LayerNorm with weight and bias (Phi-2).
    Layer,
}

/// A norm and its epsilon.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Norm {
    /// The formula.
    pub kind: NormKind,
    /// Epsilon (`rms_norm_eps` or `layer_norm_eps`).
    pub eps: f64,
}

/// The MLP activation, as config.json names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu` (`swish`).
    Silu,
    /// The tanh approximation of GELU as one kernel (`gelu_pytorch_tanh`).
    GeluTanh,
    /// The same approximation written out as transformers' `NewGELUActivation` (`gelu_new`).
    GeluNew,
    /// Exact GELU (`gelu`).
    Gelu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses a config.json activation name.
    pub fn from_name(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            "gelu_new" => Some(Activation::GeluNew),
            "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    /// The names [`Activation::from_name`] accepts.
    pub const NAMES: &'static str = "silu, swish, gelu_pytorch_tanh, gelu_new, gelu, relu";
}

/// How a decoder layer wires its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerProgram {
    /// Llama lineage: `h = x + attn(n1(x))`, `out = h + mlp(n2(h))`.
    PreNorm,
    /// Gemma 2/3 and GLM-4: norms before and after each block,
    /// `h = x + n2(attn(n1(x)))`, `out = h + n4(mlp(n3(h)))`.
    Sandwich,
    /// Phi-2: one norm, attention and MLP side by side, `out = x + attn(n(x)) + mlp(n(x))`.
    Parallel,
}

/// What a tensor of a decoder layer is for. Norm roles hold a gain (and a bias for LayerNorm);
/// projection roles hold a `[out, in]` weight (and optionally a bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Norm before attention.
    AttnNorm,
    /// Norm after attention, before the residual add (sandwich programs).
    AttnPostNorm,
    /// Norm before the MLP.
    MlpNorm,
    /// Norm after the MLP, before the residual add (sandwich programs).
    MlpPostNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Fused `[q; k; v]` projection (one GEMM, output split).
    Qkv,
    /// Attention output projection.
    O,
    /// Per-head query norm before RoPE.
    QNorm,
    /// Per-head key norm before RoPE.
    KNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection (the only input projection of an ungated MLP).
    Up,
    /// Fused `[gate; up]` projection (one GEMM, output halves: gate first).
    GateUp,
    /// MLP down projection.
    Down,
    /// Mixture of experts: the router, `[experts, hidden]` logits of each token over the
    /// experts.
    Router,
    /// A routed expert's gate projection ([`Param::expert`] says which expert).
    ExpertGate,
    /// A routed expert's up projection.
    ExpertUp,
    /// A routed expert's down projection.
    ExpertDown,
    /// The shared expert's gate projection (Qwen2-MoE: run for every token beside the routed
    /// ones).
    SharedGate,
    /// The shared expert's up projection.
    SharedUp,
    /// The shared expert's down projection.
    SharedDown,
    /// `[1, hidden]`: the sigmoid gate scaling the shared expert's output (Qwen2-MoE's
    /// `shared_expert_gate`).
    SharedExpertGate,
    /// `[experts]`: added to the router's scores to choose the experts, never to weigh them
    /// (DeepSeek-V3's `e_score_correction_bias`; kept in f32).
    RouterBias,
    /// Multi-head latent attention (DeepSeek): the query's down-projection to `q_lora_rank`.
    QA,
    /// The RMSNorm of the query latent.
    QANorm,
    /// The query latent's up-projection to every head's nope and rope parts.
    QB,
    /// `[kv_lora_rank + rope, hidden]`: the compressed key/value latent and the shared rope key
    /// (`kv_a_proj_with_mqa`).
    KvA,
    /// The RMSNorm of the key/value latent.
    KvANorm,
    /// `[heads * (nope + v_head_dim), kv_lora_rank]`: the latent's up-projection to every head's
    /// key (nope part) and value.
    KvB,
    /// `[heads]`: each head's attention sink, a logit every query also attends to and whose
    /// share of the softmax is dropped (gpt-oss).
    Sinks,
    /// A routed expert's gate and up projections as gpt-oss stacks them: `[hidden, 2 * width]`,
    /// applied as `x · W`, gate and up interleaved column by column.
    ExpertGateUpT,
    /// Its bias, `[2 * width]`.
    ExpertGateUpBias,
    /// A routed expert's down projection applied as `x · W` (`[width, hidden]`).
    ExpertDownT,
    /// Its bias, `[hidden]`.
    ExpertDownBias,
    /// [`Role::ExpertGateUpT`] stored as MXFP4: `[2 * width, hidden / 32, 16]` bytes, each two
    /// E2M1 values (low nibble first) of a row of the untransposed `[2 * width, hidden]`.
    ExpertGateUpBlocks,
    /// Their E8M0 exponents, `[2 * width, hidden / 32]` (`2^(byte - 127)` per 32 values).
    ExpertGateUpScales,
    /// [`Role::ExpertDownT`] stored as MXFP4: `[hidden, width / 32, 16]`.
    ExpertDownBlocks,
    /// Their exponents, `[hidden, width / 32]`.
    ExpertDownScales,
}

impl Role {
    /// Whether the role belongs to one routed expert (read only when a token routes to it).
    pub fn is_expert(self) -> bool {
        matches!(
            self,
            Role::ExpertGate
                | Role::ExpertUp
                | Role::ExpertDown
                | Role::ExpertGateUpT
                | Role::ExpertGateUpBias
                | Role::ExpertDownT
                | Role::ExpertDownBias
                | Role::ExpertGateUpBlocks
                | Role::ExpertGateUpScales
                | Role::ExpertDownBlocks
                | Role::ExpertDownScales
        )
    }

    /// Whether the role is a norm.
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            Role::AttnNorm
                | Role::AttnPostNorm
                | Role::MlpNorm
                | Role::MlpPostNorm
                | Role::QNorm
                | Role::KNorm
                | Role::QANorm
                | Role::KvANorm
        )
    }

    /// Whether the role holds packed bytes (MXFP4 blocks and exponents), not floats.
    pub fn is_packed(self) -> bool {
        matches!(
            self,
            Role::ExpertGateUpBlocks
                | Role::ExpertGateUpScales
                | Role::ExpertDownBlocks
                | Role::ExpertDownScales
        )
    }

    /// Whether the role is a plain vector used as it is (neither a norm nor a projection).
    pub fn is_vector(self) -> bool {
        matches!(self, Role::RouterBias | Role::Sinks)
    }
}

/// One parameter group of a decoder layer: `{prefix}{name}.weight` (and `.bias`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// What it is for.
    pub role: Role,
    /// Name relative to the layer prefix, without `.weight` (e.g. `self_attn.qkv_proj`).
    pub name: String,
    /// Shape of the weight.
    pub shape: Vec<usize>,
    /// Whether a `.bias` of `shape[0]` elements goes with it.
    pub bias: bool,
    /// The checkpoint packs the rows in another order than the role reads: the split regroups
    /// weight (and bias) rows, cut into `order.len()` equal blocks, block `i` taken from the
    /// checkpoint's block `order[i]` (InternLM2's `wqkv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_order: Option<Vec<usize>>,
    /// The routed expert this parameter belongs to (expert roles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert: Option<usize>,
    /// The tensor is `{prefix}{name}` itself, not `{prefix}{name}.weight` (a buffer such as
    /// `mlp.gate.e_score_correction_bias`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
    /// A raw part `{base}[e]`: row `e` of the checkpoint tensor `{prefix}{base}`, which stacks
    /// one per routed expert.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stacked: bool,
}

impl Param {
    /// A `[rows, cols]` projection.
    pub fn linear(role: Role, name: &str, rows: usize, cols: usize, bias: bool) -> Param {
        Param {
            role,
            name: name.to_string(),
            shape: vec![rows, cols],
            bias,
            row_order: None,
            expert: None,
            raw: false,
            stacked: false,
        }
    }

    /// Part `e` of `{prefix}{base}`, a checkpoint tensor stacking every routed expert's
    /// `shape` tensor.
    pub fn stacked_part(role: Role, base: &str, e: usize, shape: Vec<usize>) -> Param {
        Param {
            role,
            name: format!("{base}[{e}]"),
            shape,
            bias: false,
            row_order: None,
            expert: Some(e),
            raw: true,
            stacked: true,
        }
    }

    /// The checkpoint tensor a stacked part is a row of (`{prefix}{base}`).
    pub fn stacked_source(&self, prefix: &str) -> Option<String> {
        let base = self.name.rsplit_once('[').map(|(b, _)| b)?;
        self.stacked.then(|| format!("{prefix}{base}"))
    }

    /// A vector of `len` elements named `{prefix}{name}` (no `.weight`).
    pub fn vector(role: Role, name: &str, len: usize) -> Param {
        Param {
            raw: true,
            ..Param::norm(role, name, len, false)
        }
    }

    /// The full name of its weight in layer `prefix` (`{prefix}{name}.weight`, or
    /// `{prefix}{name}` for a raw tensor).
    pub fn weight_name(&self, prefix: &str) -> String {
        if self.raw {
            format!("{prefix}{}", self.name)
        } else {
            format!("{prefix}{}.weight", self.name)
        }
    }

    /// A `[rows, cols]` projection of routed expert `expert`.
    pub fn expert(role: Role, name: &str, expert: usize, rows: usize, cols: usize) -> Param {
        Param {
            expert: Some(expert),
            ..Param::linear(role, name, rows, cols, false)
        }
    }

    /// A norm over `width` elements.
    pub fn norm(role: Role, name: &str, width: usize, bias: bool) -> Param {
        Param {
            role,
            name: name.to_string(),
            shape: vec![width],
            bias,
            row_order: None,
            expert: None,
            raw: false,
            stacked: false,
        }
    }
}

/// The names of every tensor of a model: the family's whole inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorLayout {
    /// Token embedding (without `.weight`), e.g. `model.embed_tokens`.
    pub embed: String,
    /// Final norm, e.g. `model.norm`.
    pub final_norm: String,
    /// Whether the final norm has a bias (LayerNorm).
    pub final_norm_bias: bool,
    /// Output projection, e.g. `lm_head`.
    pub lm_head: String,
    /// Whether the output projection has a bias (Phi-2).
    pub lm_head_bias: bool,
    /// Prefix of decoder layer `i` is `{layer_prefix}{i}.`.
    pub layer_prefix: String,
    /// The parameters of every decoder layer, in checkpoint order (of a mixture of experts:
    /// of its sparse layers; shared parts first, then each expert's, expert by expert, so a
    /// split stores each expert's bytes together).
    pub layer: Vec<Param>,
    /// A mixture of experts whose some layers have a dense MLP instead (Qwen-MoE's
    /// `mlp_only_layers`, DeepSeek's first layers): those layers' parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_layer: Vec<Param>,
    /// Checkpoint name prefixes read as another prefix (`(from, to)`): checkpoints that wrap the
    /// language model (Gemma 3 multimodal) use the same split and executor.
    pub aliases: Vec<(String, String)>,
    /// Checkpoint tensors under these prefixes are deliberately not used (a vision tower).
    pub ignored_prefixes: Vec<String>,
}

impl TensorLayout {
    /// The usual Llama-lineage names (`model.embed_tokens`, `model.layers.N.`, `model.norm`,
    /// `lm_head`), with the given layer parameters.
    pub fn llama_names(layer: Vec<Param>) -> TensorLayout {
        TensorLayout {
            embed: "model.embed_tokens".into(),
            final_norm: "model.norm".into(),
            final_norm_bias: false,
            lm_head: "lm_head".into(),
            lm_head_bias: false,
            layer_prefix: "model.layers.".into(),
            layer,
            dense_layer: vec![],
            aliases: vec![],
            ignored_prefixes: vec![],
        }
    }

    /// `{layer_prefix}{i}.`
    pub fn prefix(&self, i: usize) -> String {
        format!("{}{i}.", self.layer_prefix)
    }

    /// The parameters of a layer: a sparse one's (or every layer's), or a dense one's when
    /// `sparse` is false and the model has both kinds.
    pub fn params(&self, sparse: bool) -> &[Param] {
        if sparse || self.dense_layer.is_empty() {
            &self.layer
        } else {
            &self.dense_layer
        }
    }

    /// The parameter of a role, if the layer has one.
    pub fn param(&self, role: Role) -> Option<&Param> {
        self.layer.iter().find(|p| p.role == role)
    }

    /// Whether the layer has a parameter of this role.
    pub fn has(&self, role: Role) -> bool {
        self.param(role).is_some()
    }

    /// Full name of the embedding weight.
    pub fn embed_weight(&self) -> String {
        format!("{}.weight", self.embed)
    }

    /// Full name of the final norm weight.
    pub fn final_norm_weight(&self) -> String {
        format!("{}.weight", self.final_norm)
    }

    /// Full name of the LM head weight.
    pub fn lm_head_weight(&self) -> String {
        format!("{}.weight", self.lm_head)
    }
}

/// How attention scores are formed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    /// Multiplier of `q·k` (`1/sqrt(head_dim)`, or Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// `tanh(s / cap) * cap` on the scores (Gemma 2), which SDPA cannot do: such layers take
    /// the explicit attention path.
    pub softcap: Option<f64>,
    /// ALiBi instead of rotary embeddings (Baichuan 13B): `slope_h · key_position` is added to
    /// head `h`'s scores, the slopes of [`alibi_slopes`]; no rotary embedding is applied.
    #[serde(default)]
    pub alibi: bool,
    /// QWen v1's log-n attention: a query at position `p` with `p + 1 > n` is multiplied by
    /// `ln(p + 1) / ln(n)` (after rotary), `n` being config.json's `seq_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logn_length: Option<usize>,
}

impl AttentionSpec {
    /// `1 / sqrt(head_dim)` scores, nothing else.
    pub fn plain(head_dim: usize) -> AttentionSpec {
        AttentionSpec {
            scale: 1.0 / (head_dim as f64).sqrt(),
            softcap: None,
            alibi: false,
            logn_length: None,
        }
    }
}

/// The ALiBi slope of each of `heads` heads, as the ALiBi paper, BLOOM and Baichuan
/// (`_get_interleave`) compute them: for a power of two `n`, `s^(i+1)` with `s = 2^(-8/n)`;
/// otherwise the slopes of the largest power of two below `n`, then every other slope of twice
/// that power.
pub fn alibi_slopes(heads: usize) -> Vec<f64> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    if heads == 0 {
        return vec![];
    }
    if heads.is_power_of_two() {
        return power_of_two(heads);
    }
    let closest = 1usize << heads.ilog2();
    let mut out = power_of_two(closest);
    out.extend(
        alibi_slopes(2 * closest)
            .into_iter()
            .step_by(2)
            .take(heads - closest),
    );
    out
}
