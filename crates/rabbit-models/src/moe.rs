//! Mixtures of experts: what a sparse layer's feed-forward block is ([`MoeSpec`]: the router's
//! rule, the experts' width, a shared expert) and the inventory helpers the MoE families share
//! ([`MoeNames`]). The executor runs one implementation (`rabbit-core`'s `decoder/moe.rs`) and
//! reads only the experts a sweep routes to.

use serde::{Deserialize, Serialize};

use crate::arch::{unsupported, Variant};
use crate::blocks::{Param, Role};
use crate::error::Result;
use crate::resolve::Resolver;

/// How a router's logits become each token's experts and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// softmax over every expert (in f32), then the `top_k` largest (Mixtral, Qwen-MoE,
    /// DeepSeek-V2's `greedy`).
    SoftmaxTopK,
    /// DeepSeek-V2's `group_limited_greedy`: the softmax scores, the experts cut into `groups`
    /// equal groups ranked by their best score; only the best `topk_groups` groups' experts
    /// can be picked (the others' scores read as 0).
    SoftmaxGroupLimited {
        /// `n_group`.
        groups: usize,
        /// `topk_group`.
        topk_groups: usize,
    },
    /// gpt-oss: the `top_k` largest logits, then a softmax over those alone (in the compute
    /// dtype).
    TopKSoftmax,
    /// DeepSeek-V3's `noaux_tc`: sigmoid scores; the choice adds the layer's
    /// `e_score_correction_bias` and ranks groups by the sum of their two best; the weights
    /// are the plain sigmoid scores of the chosen experts.
    SigmoidGroupLimited {
        /// `n_group`.
        groups: usize,
        /// `topk_group`.
        topk_groups: usize,
    },
}

fn one() -> f64 {
    1.0
}

/// What a routed expert computes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertMlp {
    /// `down(act(gate(x)) · up(x))` with the model's activation.
    #[default]
    Gated,
    /// gpt-oss: `gu = x · W + b` with gate and up interleaved; the gate clamped above at
    /// `limit`, up to `[-limit, limit]`; `(up + 1) · gate · sigmoid(alpha · gate)`, then the
    /// down projection with its bias.
    ClampedSwiglu {
        /// `swiglu_alpha`.
        alpha: f64,
        /// `swiglu_limit`.
        limit: f64,
    },
}

/// The feed-forward block of a sparse layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeSpec {
    /// Routed experts per sparse layer.
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Each expert's MLP width (`moe_intermediate_size`; Mixtral's `intermediate_size`).
    pub expert_intermediate: usize,
    /// The router's rule.
    pub routing: Routing,
    /// The top-k weights are divided by their sum (Mixtral always; Qwen-MoE's
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// The router's logits are computed in f32 from f32 copies of the input and weight
    /// (DeepSeek), not in the compute dtype.
    #[serde(default)]
    pub router_f32: bool,
    /// The routed weights are multiplied by this after any renormalisation (DeepSeek's
    /// `routed_scaling_factor`).
    #[serde(default = "one")]
    pub scaling: f64,
    /// What each routed expert computes.
    #[serde(default)]
    pub expert_mlp: ExpertMlp,
    /// The weights are rounded to the compute dtype before scaling the experts' outputs
    /// (Qwen-MoE); otherwise an expert's output is scaled in f32 and then rounded (Mixtral).
    pub weights_in_compute_dtype: bool,
    /// A shared expert run for every token (Qwen2-MoE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedExpert>,
    /// Per layer: whether its feed-forward block is the mixture (else a dense MLP of
    /// `intermediate_size`).
    pub sparse_layers: Vec<bool>,
}

/// A shared expert: a gated MLP every token goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedExpert {
    /// Its MLP width.
    pub intermediate: usize,
    /// Its output is scaled by `sigmoid(x · shared_expert_gate)` (Qwen2-MoE).
    pub gated: bool,
}

impl MoeSpec {
    /// Whether layer `i` is sparse.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.sparse_layers.get(i).copied().unwrap_or(false)
    }

    /// Checks the sizes a config gave, naming the field that is wrong (`experts_key` and
    /// `width_key` say how the family spells the expert count and width).
    pub fn check(&self, v: &Variant, experts_key: &str, width_key: &str) -> Result<()> {
        if self.num_experts == 0 {
            return Err(unsupported(v, format!("`{experts_key}` must be positive")));
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return Err(unsupported(
                v,
                format!(
                    "`num_experts_per_tok` ({}) must be between 1 and `{experts_key}` ({})",
                    self.top_k, self.num_experts
                ),
            ));
        }
        if self.expert_intermediate == 0 {
            return Err(unsupported(v, format!("`{width_key}` must be positive")));
        }
        if self.shared.is_some_and(|s| s.intermediate == 0) {
            return Err(unsupported(
                v,
                "`shared_expert_intermediate_size` must be positive",
            ));
        }
        if !(self.scaling.is_finite() && self.scaling > 0.0) {
            return Err(unsupported(
                v,
                format!(
                    "`routed_scaling_factor` must be a positive number, got {}",
                    self.scaling
                ),
            ));
        }
        if let Routing::SoftmaxGroupLimited {
            groups,
            topk_groups,
        }
        | Routing::SigmoidGroupLimited {
            groups,
            topk_groups,
        } = self.routing
        {
            if groups == 0 || !self.num_experts.is_multiple_of(groups) {
                return Err(unsupported(
                    v,
                    format!(
                        "`n_group` ({groups}) must divide `{experts_key}` ({}) into equal groups",
                        self.num_experts
                    ),
                ));
            }
            if topk_groups == 0 || topk_groups > groups {
                return Err(unsupported(
                    v,
                    format!(
                        "`topk_group` ({topk_groups}) must be between 1 and `n_group` ({groups})"
                    ),
                ));
            }
            let reachable = topk_groups * (self.num_experts / groups);
            if self.top_k > reachable {
                return Err(unsupported(
                    v,
                    format!(
                        "`num_experts_per_tok` ({}) is more than the {reachable} experts of the \
                         best `topk_group` ({topk_groups}) groups",
                        self.top_k
                    ),
                ));
            }
            if matches!(self.routing, Routing::SigmoidGroupLimited { .. })
                && self.num_experts / groups < 2
            {
                return Err(unsupported(
                    v,
                    format!("`n_group` ({groups}) leaves fewer than 2 experts per group, which `noaux_tc` ranks by their best two"),
                ));
            }
        }
        Ok(())
    }

    /// Refuses sizes whose expert tensors could not be counted in 64 bits (every later size
    /// computation then stays in range).
    pub fn check_total(&self, v: &Variant, hidden: usize) -> Result<()> {
        let total = (|| {
            let per = (self.expert_intermediate as u128)
                .checked_mul(hidden as u128)?
                .checked_mul(3)?;
            per.checked_mul(self.num_experts as u128)?
                .checked_mul(self.sparse_layers.len() as u128)?
                .checked_mul(8)
        })();
        if total.is_none_or(|t| t > u64::MAX as u128) {
            return Err(unsupported(
                v,
                "sizes too large: the experts' tensors hold more than 2^64 bytes",
            ));
        }
        Ok(())
    }
}

/// The number of routed experts, which config.json spells `num_experts` or `num_local_experts`
/// (transformers maps one onto the other: Qwen3-MoE checkpoints on the hub write the first,
/// transformers 5 saves the second); both given and different is refused.
pub fn take_num_experts(r: &mut Resolver<'_>, default: usize) -> Result<usize> {
    // Absent keys read as this; an explicit `null` (which transformers cannot run) as `None`.
    const ABSENT: usize = usize::MAX;
    let mut take = |key: &str| -> Result<Option<usize>> {
        match r.take_or(key, Some(ABSENT))? {
            None => Err(unsupported(r.variant(), format!("`{key}` is null"))),
            Some(ABSENT) => Ok(None),
            Some(n) => Ok(Some(n)),
        }
    };
    let a = take("num_experts")?;
    let b = take("num_local_experts")?;
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(unsupported(
            r.variant(),
            format!("`num_experts` ({a}) and `num_local_experts` ({b}) disagree"),
        )),
        (a, b) => Ok(a.or(b).unwrap_or(default)),
    }
}

/// Which layers are sparse as Qwen-MoE says: layer `i` unless `i` is in `mlp_only_layers`,
/// and only every `decoder_sparse_step`-th layer (1-based).
pub fn qwen_sparse_layers(
    v: &Variant,
    layers: usize,
    step: usize,
    mlp_only: &[usize],
) -> Result<Vec<bool>> {
    if step == 0 {
        return Err(unsupported(v, "`decoder_sparse_step` must be positive"));
    }
    if let Some(bad) = mlp_only.iter().find(|&&i| i >= layers) {
        return Err(unsupported(
            v,
            format!("`mlp_only_layers` names layer {bad} but the model has {layers}"),
        ));
    }
    Ok((0..layers)
        .map(|i| !mlp_only.contains(&i) && (i + 1) % step == 0)
        .collect())
}

/// The checkpoint names of a family's mixture block.
pub struct MoeNames {
    /// The router, e.g. `mlp.gate`.
    pub router: &'static str,
    /// Expert `e`'s prefix is `{experts}{e}.`, e.g. `mlp.experts.`.
    pub experts: &'static str,
    /// The gate, up and down projections' names inside an expert (`gate_proj`, `up_proj`,
    /// `down_proj`; Mixtral: `w1`, `w3`, `w2`).
    pub projections: [&'static str; 3],
    /// The shared expert's prefix and its gate's name (Qwen2-MoE: `mlp.shared_expert`,
    /// `mlp.shared_expert_gate`; the gate's name is unused when the shared expert has none).
    pub shared: Option<(&'static str, &'static str)>,
    /// The router's selection bias, e.g. `mlp.gate.e_score_correction_bias` (DeepSeek-V3).
    pub router_bias: Option<&'static str>,
}

impl MoeNames {
    /// The feed-forward parameters of a sparse layer: router, shared expert, then the routed
    /// experts one after the other (each expert's projections adjacent: the split writes them
    /// in this order, so one read fetches one expert).
    pub fn params(&self, moe: &MoeSpec, hidden: usize) -> Vec<Param> {
        let mut out = vec![Param::linear(
            Role::Router,
            self.router,
            moe.num_experts,
            hidden,
            false,
        )];
        if let Some(name) = self.router_bias {
            out.push(Param::vector(Role::RouterBias, name, moe.num_experts));
        }
        if let (Some((prefix, gate)), Some(s)) = (self.shared, moe.shared) {
            let m = s.intermediate;
            let [g, u, d] = self.projections;
            out.push(Param::linear(
                Role::SharedGate,
                &format!("{prefix}.{g}"),
                m,
                hidden,
                false,
            ));
            out.push(Param::linear(
                Role::SharedUp,
                &format!("{prefix}.{u}"),
                m,
                hidden,
                false,
            ));
            out.push(Param::linear(
                Role::SharedDown,
                &format!("{prefix}.{d}"),
                hidden,
                m,
                false,
            ));
            if s.gated {
                out.push(Param::linear(
                    Role::SharedExpertGate,
                    gate,
                    1,
                    hidden,
                    false,
                ));
            }
        }
        let m = moe.expert_intermediate;
        let [g, u, d] = self.projections;
        for e in 0..moe.num_experts {
            let p = format!("{}{e}.", self.experts);
            out.push(Param::expert(
                Role::ExpertGate,
                &format!("{p}{g}"),
                e,
                m,
                hidden,
            ));
            out.push(Param::expert(
                Role::ExpertUp,
                &format!("{p}{u}"),
                e,
                m,
                hidden,
            ));
            out.push(Param::expert(
                Role::ExpertDown,
                &format!("{p}{d}"),
                e,
                hidden,
                m,
            ));
        }
        out
    }
}
