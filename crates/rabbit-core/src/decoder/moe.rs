//! The mixture-of-experts feed-forward block, written once for every family: the router's
//! top-k, then each routed expert over the tokens routed to it, in ascending expert order as
//! transformers' eager loop does, plus the shared expert. The experts come from an
//! [`ExpertSource`]: a resident layer holds all of them; a streamed one reads only those the
//! router picked, after it has run.

use std::collections::BTreeMap;

use rabbit_models::{ModelSpec, MoeSpec, Role, Routing};
use tch::{Kind, Tensor};

use super::blocks;
use crate::error::{CoreError, Result};
use crate::weights::{LayerWeights, Linear};

/// One routed expert's gated MLP.
pub struct ExpertWeights {
    /// Gate projection.
    pub gate: Linear,
    /// Up projection.
    pub up: Linear,
    /// Down projection.
    pub down: Linear,
}

impl ExpertWeights {
    /// Its dense tensors (to hand dequantization buffers back).
    pub fn into_tensors(self) -> impl Iterator<Item = Tensor> {
        self.gate
            .into_tensors()
            .chain(self.up.into_tensors())
            .chain(self.down.into_tensors())
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

/// Routes `[N, hidden]` tokens: returns the top-k weights `[N, k]` (f32, or the compute dtype
/// where the family rounds them) and which tokens go to which expert.
/// `what` names the layer in errors.
pub fn route(moe: &MoeSpec, router: &Linear, x: &Tensor, what: &str) -> Result<(Tensor, Routes)> {
    let logits = router.forward(x)?;
    let experts = logits.size().last().copied().unwrap_or(0);
    if experts != moe.num_experts as i64 {
        return Err(CoreError::InvalidInput(format!(
            "{what}: the router gives {experts} scores per token but config.json says {} experts",
            moe.num_experts
        )));
    }
    let (mut weights, index) = match moe.routing {
        Routing::SoftmaxTopK => {
            let probs = logits.f_softmax(-1, Kind::Float)?;
            probs.f_topk(moe.top_k as i64, -1, true, true)?
        }
    };
    if moe.renormalize {
        weights = weights.f_div(&weights.f_sum_dim_intlist(-1, true, Kind::Float)?)?;
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
    let (weights, routes) = route(moe, w.req_linear(Role::Router)?, &flat, w.file())?;
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
        let h = act(&ex.gate.forward(&xs)?)?.f_mul(&ex.up.forward(&xs)?)?;
        let y = ex.down.forward(&h)?;
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
