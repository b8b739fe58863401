//! DeepSeek-V2 and DeepSeek-V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`): multi-head
//! latent attention (`mla.rs`: a query latent with its norm, a key/value latent cached instead
//! of the heads, the rope/nope split, `v_head_dim`, yarn's mscale in the softmax scale), dense
//! MLPs in the first `first_k_dense_replace` layers, then a mixture of `n_routed_experts` with
//! `n_shared_experts` always-on experts. V2 routes by softmax (`greedy` or
//! `group_limited_greedy`), V3 by sigmoid with `e_score_correction_bias` for the choice only
//! (`noaux_tc`); both scale the weights by `routed_scaling_factor`.

use serde_json::{json, Map, Value};

use crate::arch::{unsupported, Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, AttentionSpec, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::mla::MlaSpec;
use crate::moe::{ExpertMlp, MoeNames, MoeSpec, Routing, SharedExpert};
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

/// Training and parallelism settings: the auxiliary losses, expert-parallel size, and the
/// tensor-parallel slicing transformers ignores.
const HARMLESS: &[&str] = &[
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "pretraining_tp",
    "output_router_logits",
    "router_aux_loss_coef",
];

const COMMON: Variant = Variant {
    name: "DeepseekV2ForCausalLM",
    model_type: "deepseek_v2",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: HARMLESS,
};

static V2_VARIANT: Variant = COMMON;

static V3_VARIANT: Variant = Variant {
    name: "DeepseekV3ForCausalLM",
    model_type: "deepseek_v3",
    ..COMMON
};

/// One of the DeepSeek generations.
pub struct Deepseek {
    variant: &'static Variant,
    key: &'static str,
    /// V3: sigmoid routing with the correction bias, `rope_interleave`, MTP layers.
    v3: bool,
}

/// `DeepseekV2ForCausalLM`.
pub static DEEPSEEK_V2: Deepseek = Deepseek {
    variant: &V2_VARIANT,
    key: "deepseek_v2",
    v3: false,
};

/// `DeepseekV3ForCausalLM`.
pub static DEEPSEEK_V3: Deepseek = Deepseek {
    variant: &V3_VARIANT,
    key: "deepseek_v3",
    v3: true,
};

/// The defaults of transformers' config classes where the two differ.
struct Defaults {
    experts: usize,
    shared: usize,
    top_k: Option<usize>,
    moe_intermediate: usize,
    scaling: f64,
    groups: Option<usize>,
    topk_groups: Option<usize>,
    first_dense: usize,
    norm_topk: bool,
}

const V2_DEFAULTS: Defaults = Defaults {
    experts: 64,
    shared: 2,
    top_k: None,
    moe_intermediate: 1407,
    scaling: 1.0,
    groups: None,
    topk_groups: None,
    first_dense: 0,
    norm_topk: false,
};

const V3_DEFAULTS: Defaults = Defaults {
    experts: 256,
    shared: 1,
    top_k: Some(8),
    moe_intermediate: 2048,
    scaling: 2.5,
    groups: Some(8),
    topk_groups: Some(4),
    first_dense: 3,
    norm_topk: true,
};

impl Deepseek {
    /// Reads the latent attention's sizes.
    fn mla(&self, r: &mut Resolver<'_>) -> Result<MlaSpec> {
        let v = self.variant;
        let mut size = |key: &str, default: usize| -> Result<usize> {
            match r.take_or(key, Some(default))? {
                Some(n) if n > 0 => Ok(n),
                _ => Err(unsupported(
                    v,
                    format!("`{key}` must be a positive integer"),
                )),
            }
        };
        let kv_lora_rank = size("kv_lora_rank", 512)?;
        let qk_nope_head_dim = size("qk_nope_head_dim", 128)?;
        let qk_rope_head_dim = size("qk_rope_head_dim", 64)?;
        let v_head_dim = size("v_head_dim", 128)?;
        // An explicit null means one q_proj, as DeepSeek-V2-Lite has.
        let q_lora_rank: Option<usize> = r.take_or("q_lora_rank", Some(1536))?;
        if q_lora_rank == Some(0) {
            return Err(unsupported(v, "`q_lora_rank` must be positive or null"));
        }
        if !qk_rope_head_dim.is_multiple_of(2) {
            return Err(unsupported(
                v,
                format!("`qk_rope_head_dim` ({qk_rope_head_dim}) must be even"),
            ));
        }
        let deinterleave = if self.v3 {
            r.take_or("rope_interleave", Some(true))?.unwrap_or(false)
        } else {
            false
        };
        let mla = MlaSpec {
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            deinterleave,
            latent_norm_eps: 1e-6,
        };
        // transformers writes the derived `qk_head_dim` (and `head_dim` = the rope width)
        // into the configs it saves.
        if let Some(d) = r.take::<usize>("qk_head_dim")? {
            if d != mla.qk_head_dim() {
                return Err(unsupported(
                    v,
                    format!(
                        "`qk_head_dim` ({d}) is not `qk_nope_head_dim` + `qk_rope_head_dim` ({})",
                        mla.qk_head_dim()
                    ),
                ));
            }
        }
        r.set_head_dim(qk_rope_head_dim);
        Ok(mla)
    }

    /// Reads the mixture: experts, routing and which layers are sparse.
    fn moe(&self, r: &mut Resolver<'_>, layers: usize) -> Result<MoeSpec> {
        let v = self.variant;
        let d = if self.v3 { V3_DEFAULTS } else { V2_DEFAULTS };
        let experts: usize = r
            .take_or("n_routed_experts", Some(d.experts))?
            .ok_or_else(|| {
                unsupported(v, "`n_routed_experts` is null (a model without experts)")
            })?;
        let top_k: usize = r
            .take_or("num_experts_per_tok", d.top_k)?
            .ok_or_else(|| unsupported(v, "config.json has no `num_experts_per_tok`"))?;
        let inter: usize = r
            .take_or("moe_intermediate_size", Some(d.moe_intermediate))?
            .unwrap_or(0);
        let shared: usize = r
            .take_or("n_shared_experts", Some(d.shared))?
            .filter(|&n| n > 0)
            .ok_or_else(|| unsupported(v, "`n_shared_experts` must be positive"))?;
        let scaling: f64 = r
            .take_or("routed_scaling_factor", Some(d.scaling))?
            .unwrap_or(0.0);
        let first_dense: usize = r
            .take_or("first_k_dense_replace", Some(d.first_dense))?
            .ok_or_else(|| unsupported(v, "`first_k_dense_replace` is null"))?;
        // The original code's `layer_idx % moe_layer_freq == 0`; transformers knows only 1.
        if let Some(f) = r.take::<usize>("moe_layer_freq")? {
            if f != 1 {
                return Err(unsupported(
                    v,
                    format!("`moe_layer_freq` {f} is not supported (only 1)"),
                ));
            }
        }
        let norm_topk: bool = r
            .take_or("norm_topk_prob", Some(d.norm_topk))?
            .unwrap_or(false);
        let groups: Option<usize> = r.take_or("n_group", d.groups)?;
        let topk_groups: Option<usize> = r.take_or("topk_group", d.topk_groups)?;
        let method: Option<String> = r.take("topk_method")?;
        let scoring: Option<String> = r.take("scoring_func")?;
        let need_groups = || -> Result<(usize, usize)> {
            match (groups, topk_groups) {
                (Some(g), Some(t)) => Ok((g, t)),
                _ => Err(unsupported(
                    v,
                    "this routing needs `n_group` and `topk_group`",
                )),
            }
        };
        let (routing, renormalize) = if self.v3 {
            if let Some(m) = method.as_deref().filter(|m| *m != "noaux_tc") {
                return Err(unsupported(
                    v,
                    format!(
                        "`topk_method` `{m}` is not supported (DeepSeek-V3 routes by `noaux_tc`)"
                    ),
                ));
            }
            if let Some(s) = scoring.as_deref().filter(|s| *s != "sigmoid") {
                return Err(unsupported(
                    v,
                    format!(
                        "`scoring_func` `{s}` is not supported (DeepSeek-V3 scores by `sigmoid`)"
                    ),
                ));
            }
            let (groups, topk_groups) = need_groups()?;
            (
                Routing::SigmoidGroupLimited {
                    groups,
                    topk_groups,
                },
                norm_topk,
            )
        } else {
            if let Some(s) = scoring.as_deref().filter(|s| *s != "softmax") {
                return Err(unsupported(
                    v,
                    format!(
                        "`scoring_func` `{s}` is not supported (DeepSeek-V2 scores by `softmax`)"
                    ),
                ));
            }
            if norm_topk {
                // The original code renormalises, transformers does not: refuse rather than
                // pick one of two answers.
                return Err(unsupported(
                    v,
                    "`norm_topk_prob: true` is not supported (transformers and DeepSeek's own code disagree on it)",
                ));
            }
            let routing = match method.as_deref().unwrap_or("greedy") {
                "greedy" => Routing::SoftmaxTopK,
                "group_limited_greedy" => {
                    let (groups, topk_groups) = need_groups()?;
                    Routing::SoftmaxGroupLimited {
                        groups,
                        topk_groups,
                    }
                }
                other => {
                    return Err(unsupported(
                        v,
                        format!(
                        "`topk_method` `{other}` is not supported (greedy, group_limited_greedy)"
                    ),
                    ))
                }
            };
            (routing, false)
        };
        let moe = MoeSpec {
            num_experts: experts,
            top_k,
            expert_intermediate: inter,
            routing,
            renormalize,
            router_f32: true,
            scaling,
            expert_mlp: ExpertMlp::Gated,
            weights_in_compute_dtype: false,
            shared: Some(SharedExpert {
                intermediate: inter.saturating_mul(shared),
                gated: false,
            }),
            sparse_layers: (0..layers).map(|i| i >= first_dense).collect(),
        };
        moe.check(v, "n_routed_experts", "moe_intermediate_size")?;
        Ok(moe)
    }
}

/// `yarn_get_mscale` of transformers' DeepSeek code.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// The softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2` when the
/// rope is scaled and gives `mscale_all_dim` (transformers' `yarn_apply_mscale`).
fn softmax_scale(cfg: &HfConfig, qk_head_dim: usize) -> f64 {
    let base = (qk_head_dim as f64).powf(-0.5);
    let params = [&cfg.rope_parameters, &cfg.rope_scaling]
        .into_iter()
        .flatten()
        .find(|p| !p.is_null());
    let Some(p) = params else { return base };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let all_dim = p
        .get("mscale_all_dim")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let factor = p.get("factor").and_then(Value::as_f64);
    match factor {
        Some(f) if kind != "default" && all_dim != 0.0 => {
            let m = yarn_mscale(f, all_dim);
            base * m * m
        }
        _ => base,
    }
}

impl Architecture for Deepseek {
    fn variant(&self) -> &'static Variant {
        self.variant
    }

    fn key(&self) -> &'static str {
        self.key
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        let v = self.variant;
        let mut r = Resolver::new(v, cfg, gen);
        let mla = self.mla(&mut r)?;
        if let Some(d) = cfg.head_dim.filter(|&d| d != mla.qk_rope_head_dim) {
            return Err(unsupported(
                v,
                format!(
                    "`head_dim` ({d}) is not `qk_rope_head_dim` ({}), the width the rope rotates",
                    mla.qk_rope_head_dim
                ),
            ));
        }
        let moe = self.moe(&mut r, cfg.num_hidden_layers)?;
        let mtp: usize = if self.v3 {
            let a: Option<usize> = r.take("num_nextn_predict_layers")?;
            let b: Option<usize> = r.take("num_mtp_layers")?;
            match (a, b) {
                (Some(a), Some(b)) if a != b => {
                    return Err(unsupported(
                        v,
                        format!(
                            "`num_nextn_predict_layers` ({a}) and `num_mtp_layers` ({b}) disagree"
                        ),
                    ))
                }
                (a, b) => a.or(b).unwrap_or(0),
            }
        } else {
            0
        };
        let mut spec = r.base()?;
        if spec.num_kv_heads != spec.num_heads {
            // The latent expands into every head; transformers cannot run fewer KV heads.
            return Err(unsupported(
                v,
                format!(
                    "`num_key_value_heads` ({}) must equal `num_attention_heads` ({}) with latent attention",
                    spec.num_kv_heads, spec.num_heads
                ),
            ));
        }
        moe.check_total(v, spec.hidden_size)?;
        let (h, heads) = (spec.hidden_size, spec.num_heads);
        let bias = cfg.attention_bias.unwrap_or(false);
        let mlp_bias = !self.v3 && cfg.mlp_bias.unwrap_or(false);
        if self.v3 && cfg.mlp_bias == Some(true) {
            return Err(unsupported(v, "`mlp_bias: true` is not supported"));
        }
        let mut common = vec![Param::norm(Role::AttnNorm, "input_layernorm", h, false)];
        common.extend(mla.params(heads, h, bias));
        common.push(Param::norm(
            Role::MlpNorm,
            "post_attention_layernorm",
            h,
            false,
        ));
        let names = MoeNames {
            router: "mlp.gate",
            experts: "mlp.experts.",
            projections: ["gate_proj", "up_proj", "down_proj"],
            shared: Some(("mlp.shared_experts", "")),
            router_bias: self.v3.then_some("mlp.gate.e_score_correction_bias"),
        };
        let mut sparse = common.clone();
        sparse.extend(names.params(&moe, h).into_iter().map(|mut p| {
            // V2's shared experts are its MLP class, with `mlp_bias`.
            p.bias |=
                mlp_bias && matches!(p.role, Role::SharedGate | Role::SharedUp | Role::SharedDown);
            p
        }));
        let mut layers = TensorLayout::llama_names(sparse);
        if moe.sparse_layers.iter().any(|s| !s) {
            let m = spec.intermediate_size;
            let mut dense = common;
            dense.extend([
                Param::linear(Role::Gate, "mlp.gate_proj", m, h, mlp_bias),
                Param::linear(Role::Up, "mlp.up_proj", m, h, mlp_bias),
                Param::linear(Role::Down, "mlp.down_proj", h, m, mlp_bias),
            ]);
            layers.dense_layer = dense;
        }
        if mtp > 0 {
            let l = spec.num_layers;
            layers.ignored_prefixes = (l..l + mtp).map(|i| format!("model.layers.{i}.")).collect();
            spec.notes.push(format!(
                "the checkpoint's multi-token-prediction layer{} (model.layers.{l}{}) {} not used, as in transformers",
                if mtp > 1 { "s" } else { "" },
                if mtp > 1 { format!("..{}", l + mtp - 1) } else { String::new() },
                if mtp > 1 { "are" } else { "is" },
            ));
        }
        spec.tensors = layers;
        // V2 rotates interleaved pairs as complex numbers in f32; V3 turns its interleaved
        // pairs into halves and rotates in the compute dtype.
        spec.rope.interleaved = !self.v3;
        spec.rope.rotate_f32 = !self.v3;
        spec.head_dim = mla.qk_head_dim();
        spec.attention = AttentionSpec {
            scale: softmax_scale(cfg, mla.qk_head_dim()),
            ..AttentionSpec::plain(mla.qk_head_dim())
        };
        spec.moe = Some(moe);
        spec.mla = Some(mla);
        Ok(spec)
    }

    fn synth_config(&self, s: &SynthShape) -> Option<Map<String, Value>> {
        let rope = (s.head_dim / 2).max(2).next_multiple_of(2);
        let mut cfg = json!({
            "kv_lora_rank": (s.hidden / 4).max(8), "qk_nope_head_dim": s.head_dim,
            "qk_rope_head_dim": rope, "v_head_dim": s.head_dim,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
            "moe_intermediate_size": (s.hidden / 2).max(1), "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "aux_loss_alpha": 0.001, "seq_aux": true, "ep_size": 1,
            "pretraining_tp": 1, "tie_word_embeddings": false, "attention_bias": false,
            // The latent expands into every query head.
            "num_key_value_heads": s.heads,
        });
        let m = cfg.as_object_mut()?;
        if self.v3 {
            for (k, v) in [
                ("q_lora_rank", json!((s.hidden / 2).max(8))),
                ("n_group", json!(2)),
                ("topk_group", json!(1)),
                ("topk_method", json!("noaux_tc")),
                ("scoring_func", json!("sigmoid")),
                ("norm_topk_prob", json!(true)),
                ("routed_scaling_factor", json!(2.5)),
                ("num_nextn_predict_layers", json!(0)),
                ("rope_interleave", json!(true)),
            ] {
                m.insert(k.into(), v);
            }
        } else {
            for (k, v) in [
                ("topk_method", json!("greedy")),
                ("scoring_func", json!("softmax")),
                ("norm_topk_prob", json!(false)),
                ("routed_scaling_factor", json!(1.0)),
                ("n_group", json!(1)),
                ("topk_group", json!(1)),
            ] {
                m.insert(k.into(), v);
            }
        }
        Some(m.clone())
    }

    fn synth_finish(&self, cfg: &mut Map<String, Value>) {
        // The hub's configs have no `head_dim` (transformers derives it from the rope width).
        cfg.remove("head_dim");
        if !self.v3 {
            // V2-Lite's single q_proj unless the shape gives a query latent (a `null` in the
            // family's keys would read as "remove").
            cfg.entry("q_lora_rank").or_insert(Value::Null);
        }
    }
}
