//! The mixture-of-experts feed-forward block, written once for every family: the router's
//! top-k, then each routed expert over the tokens routed to it, in ascending expert order as
//! transformers' eager loop does, plus the shared expert. The experts come from an
//! [`ExpertSource`]: a resident layer holds all of them; a streamed one reads only those the
//! router picked, after it has run.

use std::collections::BTreeMap;

use rabbit_models::{ExpertMlp, ModelSpec, MoeSpec, Role, Routing};
use tch::{Kind, Tensor};

use super::blocks;
use crate::error::{CoreError, Result};
use crate::weights::{LayerWeights, Linear, LinearWeight};

/// One routed expert's gated MLP.
pub struct ExpertWeights {
    /// Gate projection (`None`: fused into `up`, gpt-oss's interleaved gate/up).
    pub gate: Option<Linear>,
    /// Up projection (or the fused gate/up one).
    pub up: Linear,
    /// Down projection.
    pub down: Linear,
}

impl ExpertWeights {
    /// Its dense tensors (to hand dequantization buffers back).
    pub fn into_tensors(self) -> impl Iterator<Item = Tensor> {
        self.gate
            .into_iter()
            .flat_map(Linear::into_tensors)
            .chain(self.up.into_tensors())
            .chain(self.down.into_tensors())
    }

    /// The expert on `x` (`[n, hidden]`).
    fn forward(&self, spec: &ModelSpec, mlp: ExpertMlp, x: &Tensor) -> Result<Tensor> {
        let h = match (mlp, &self.gate) {
            (ExpertMlp::Gated, Some(gate)) => {
                blocks::activate(&gate.forward(x)?, spec.activation)?.f_mul(&self.up.forward(x)?)?
            }
            (ExpertMlp::ClampedSwiglu { alpha, limit }, None) => {
                let gu = self.up.forward(x)?;
                let gate = gu.f_slice(-1, 0, None, 2)?.f_clamp_max(limit)?;
                let up = gu.f_slice(-1, 1, None, 2)?.f_clamp(-limit, limit)?;
                let glu = gate.f_mul(&gate.f_mul_scalar(alpha)?.f_sigmoid()?)?;
                up.f_add_scalar(1.0)?.f_mul(&glu)?
            }
            _ => {
                return Err(CoreError::InvalidInput(
                    "an expert's projections do not match its kind".into(),
                ))
            }
        };
        self.down.forward(&h)
    }
}

/// Where a sparse layer's experts come from during its sweep.
pub trait ExpertSource {
    /// Announces the experts `ids` (ascending, distinct) the block will ask for.
    fn load(&mut self, ids: &[usize]) -> Result<()>;
    /// One of those experts (read on first use).
    fn expert(&mut self, e: usize) -> Result<&ExpertWeights>;
}

/// The experts a layer's weights hold (resident layers, and streamed layers read whole).
pub struct HeldExperts<'a>(pub &'a BTreeMap<usize, ExpertWeights>, pub &'a str);

impl ExpertSource for HeldExperts<'_> {
    fn load(&mut self, _ids: &[usize]) -> Result<()> {
        Ok(())
    }

    fn expert(&mut self, e: usize) -> Result<&ExpertWeights> {
        self.0.get(&e).ok_or_else(|| CoreError::BadTensor {
            file: self.1.into(),
            tensor: format!("expert {e}"),
            reason: "the router chose an expert whose weights the layer does not hold".into(),
        })
    }
}

/// The tokens routed to each expert, as transformers' `torch.where(expert_mask[e])` orders
/// them: by top-k slot, then by token.
pub struct Routes {
    /// Per expert (ascending): `(token, slot)` pairs.
    pub per_expert: BTreeMap<usize, Vec<(i64, i64)>>,
}

impl Routes {
    /// The distinct experts chosen, ascending.
    pub fn experts(&self) -> Vec<usize> {
        self.per_expert.keys().copied().collect()
    }
}

/// A layer's router: its `[experts, hidden]` projection and, for DeepSeek-V3, the bias added
/// to the scores for the choice only.
pub struct Router<'a> {
    /// The projection.
    pub linear: &'a Linear,
    /// `e_score_correction_bias` (`[experts]`).
    pub bias: Option<&'a Tensor>,
}

impl<'a> Router<'a> {
    /// The router of a layer's weights.
    pub fn of(w: &'a LayerWeights) -> Result<Router<'a>> {
        Ok(Router {
            linear: w.req_linear(Role::Router)?,
            bias: w.vector(Role::RouterBias),
        })
    }

    /// The logits `[N, experts]`: in the compute dtype, or in f32 from f32 copies of the
    /// input and weight (`router_f32`).
    fn logits(&self, x: &Tensor, f32: bool) -> Result<Tensor> {
        match (&self.linear.weight, f32) {
            (LinearWeight::Dense(w), true) => Ok(x
                .f_to_kind(Kind::Float)?
                .f_linear(&w.f_to_kind(Kind::Float)?, None::<&Tensor>)?),
            // Routers are never compressed by the split; a packed one is widened after.
            (_, true) => Ok(self.linear.forward(x)?.f_to_kind(Kind::Float)?),
            (_, false) => self.linear.forward(x),
        }
    }
}

/// The `groups` groups of `choice` (`[N, experts]`) that rank best by `score` of each group
/// (`[N, groups]`) keep their experts; the others' entries become `fill`.
fn keep_best_groups(
    choice: &Tensor,
    group_score: &Tensor,
    topk_groups: usize,
    fill: f64,
) -> Result<Tensor> {
    let (n, groups) = (group_score.size()[0], group_score.size()[1]);
    let experts = choice.size()[1];
    let best = group_score.f_topk(topk_groups as i64, -1, true, false)?.1;
    let mask = group_score
        .f_zeros_like()?
        .f_scatter_value(1, &best, 1.0)?
        .f_unsqueeze(-1)?
        .f_expand([n, groups, experts / groups], false)?
        .f_reshape([n, experts])?
        .f_to_kind(Kind::Bool)?;
    Ok(choice.f_masked_fill(&mask.f_logical_not()?, fill)?)
}

/// Routes `[N, hidden]` tokens: returns the top-k weights `[N, k]` (f32, or the compute dtype
/// where the family rounds them) and which tokens go to which expert.
/// `what` names the layer in errors.
pub fn route(
    moe: &MoeSpec,
    router: Router<'_>,
    x: &Tensor,
    what: &str,
) -> Result<(Tensor, Routes)> {
    let logits = router.logits(x, moe.router_f32)?;
    let experts = logits.size().last().copied().unwrap_or(0);
    if experts != moe.num_experts as i64 {
        return Err(CoreError::InvalidInput(format!(
            "{what}: the router gives {experts} scores per token but config.json says {} experts",
            moe.num_experts
        )));
    }
    let k = moe.top_k as i64;
    let n = logits.size()[0];
    let grouped = |scores: &Tensor, groups: usize| -> Result<Tensor> {
        Ok(scores.f_view([n, groups as i64, experts / groups as i64])?)
    };
    let (mut weights, index) = match moe.routing {
        Routing::SoftmaxTopK => logits
            .f_softmax(-1, Kind::Float)?
            .f_topk(k, -1, true, true)?,
        Routing::TopKSoftmax => {
            let (top, index) = logits.f_topk(k, -1, true, true)?;
            (top.f_softmax(-1, top.kind())?, index)
        }
        Routing::SoftmaxGroupLimited {
            groups,
            topk_groups,
        } => {
            let scores = logits.f_softmax(-1, Kind::Float)?;
            let best = grouped(&scores, groups)?.f_amax(-1, false)?;
            keep_best_groups(&scores, &best, topk_groups, 0.0)?.f_topk(k, -1, true, true)?
        }
        Routing::SigmoidGroupLimited {
            groups,
            topk_groups,
        } => {
            let scores = logits.f_to_kind(Kind::Float)?.f_sigmoid()?;
            let choice = match router.bias {
                Some(b) => scores.f_add(&b.f_to_kind(Kind::Float)?)?,
                None => scores.shallow_clone(),
            };
            let best_two = grouped(&choice, groups)?
                .f_topk(2, -1, true, true)?
                .0
                .f_sum_dim_intlist(-1, false, Kind::Float)?;
            let choice = keep_best_groups(&choice, &best_two, topk_groups, f64::NEG_INFINITY)?;
            let index = choice.f_topk(k, -1, true, true)?.1;
            (scores.f_gather(1, &index, false)?, index)
        }
    };
    if moe.renormalize {
        let mut sum = weights.f_sum_dim_intlist(-1, true, Kind::Float)?;
        if matches!(moe.routing, Routing::SigmoidGroupLimited { .. }) {
            // DeepSeek-V3 guards the division.
            sum = sum.f_add_scalar(1e-20)?;
        }
        weights = weights.f_div(&sum)?;
    }
    if moe.scaling != 1.0 {
        weights = weights.f_mul_scalar(moe.scaling)?;
    }
    if moe.weights_in_compute_dtype {
        weights = weights.f_to_kind(x.kind())?;
    }
    let k = moe.top_k;
    let ids: Vec<i64> = Vec::<i64>::try_from(
        index
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Int64)?
            .f_flatten(0, -1)?,
    )?;
    let mut per_expert: BTreeMap<usize, Vec<(i64, i64)>> = BTreeMap::new();
    for slot in 0..k {
        for (token, row) in ids.chunks(k).enumerate() {
            per_expert
                .entry(row[slot] as usize)
                .or_default()
                .push((token as i64, slot as i64));
        }
    }
    Ok((weights, Routes { per_expert }))
}

/// The mixture block on `x` (any leading shape, hidden last): routed experts plus the shared
/// expert.
pub fn moe_forward(
    spec: &ModelSpec,
    moe: &MoeSpec,
    w: &LayerWeights,
    x: &Tensor,
    source: &mut dyn ExpertSource,
) -> Result<Tensor> {
    let shape = x.size();
    let hidden = *shape.last().unwrap_or(&0);
    let flat = x.f_reshape([-1, hidden])?;
    let (weights, routes) = route(moe, Router::of(w)?, &flat, w.file())?;
    source.load(&routes.experts())?;
    let act = |t: &Tensor| blocks::activate(t, spec.activation);
    let mut out = flat.f_zeros_like()?;
    let device = flat.device();
    for (&e, pairs) in &routes.per_expert {
        let ex = source.expert(e)?;
        let tokens: Vec<i64> = pairs.iter().map(|p| p.0).collect();
        let slots: Vec<i64> = pairs.iter().map(|p| p.1).collect();
        let tokens = Tensor::f_from_slice(&tokens)?.f_to_device(device)?;
        let slots = Tensor::f_from_slice(&slots)?.f_to_device(device)?;
        let xs = flat.f_index_select(0, &tokens)?;
        let y = ex.forward(spec, moe.expert_mlp, &xs)?;
        // weights[token, slot]: f32 (Mixtral: the product is f32, then rounded) or the compute
        // dtype (Qwen-MoE).
        let scale = weights
            .f_index(&[Some(&tokens), Some(&slots)])?
            .f_unsqueeze(-1)?;
        let y = y.f_mul(&scale)?.f_to_kind(out.kind())?;
        let _ = out.f_index_add_(0, &tokens, &y)?;
    }

    if let Some(shared) = moe.shared {
        let g = w.req_linear(Role::SharedGate)?.forward(&flat)?;
        let u = w.req_linear(Role::SharedUp)?.forward(&flat)?;
        let mut s = w
            .req_linear(Role::SharedDown)?
            .forward(&act(&g)?.f_mul(&u)?)?;
        if shared.gated {
            let gate = w.req_linear(Role::SharedExpertGate)?.forward(&flat)?;
            s = gate.f_sigmoid()?.f_mul(&s)?;
        }
        out = out.f_add(&s)?;
    }
    Ok(out.f_reshape(&shape)?)
}
