//! The shared blocks, written once: norms, rotary embeddings, attention (SDPA, and an explicit
//! path for what SDPA cannot do), and MLPs. Each computes exactly as transformers does, down to
//! where it casts between f32 and the compute dtype.

use rabbit_models::{Activation, AttentionSpec, Norm, NormKind};
use tch::{Kind, Tensor};

use crate::error::Result;

/// A norm's parameters, ready for [`norm`]: for [`NormKind::RmsOffset`] the weight already is
/// `1 + w` in f32.
pub struct NormWeights {
    /// Gain.
    pub weight: Tensor,
    /// Bias (LayerNorm).
    pub bias: Option<Tensor>,
}

impl NormWeights {
    /// Prepares stored norm parameters for `kind` (folds Gemma's `+1` in f32).
    pub fn bind(kind: NormKind, weight: Tensor, bias: Option<Tensor>) -> Result<NormWeights> {
        let weight = match kind {
            NormKind::RmsOffset => weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?,
            NormKind::Rms | NormKind::RmsWeightF32 | NormKind::Layer => weight,
        };
        Ok(NormWeights { weight, bias })
    }

    /// The tensors (to hand buffers back).
    pub fn into_tensors(self) -> impl Iterator<Item = Tensor> {
        std::iter::once(self.weight).chain(self.bias)
    }
}

/// Normalises the last dimension of `x`.
pub fn norm(x: &Tensor, w: &NormWeights, n: &Norm) -> Result<Tensor> {
    let kind = x.kind();
    let rms = || -> Result<Tensor> {
        let xf = x.f_to_kind(Kind::Float)?;
        let var = xf
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        Ok(xf.f_mul(&var.f_add_scalar(n.eps)?.f_rsqrt()?)?)
    };
    Ok(match n.kind {
        // transformers' LlamaRMSNorm: cast back, then scale.
        NormKind::Rms => w.weight.f_mul(&rms()?.f_to_kind(kind)?)?,
        // Gemma (weight already `1 + w` in f32) and ChatGLM: scale in f32, then cast.
        NormKind::RmsOffset | NormKind::RmsWeightF32 => rms()?.f_mul(&w.weight)?.f_to_kind(kind)?,
        NormKind::Layer => {
            let width = x.size()[x.dim() - 1];
            x.f_layer_norm([width], Some(&w.weight), w.bias.as_ref(), n.eps, false)?
        }
    })
}

/// `[x1, x2] -> [-x2, x1]` on the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], -1)?)
}

/// `(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)` (GLM's pairs).
fn rotate_pairs(x: &Tensor) -> Result<Tensor> {
    let shape = x.size();
    let d = shape[shape.len() - 1];
    let pairs = x.f_unflatten(-1, [d / 2, 2])?;
    let even = pairs.f_select(-1, 0)?;
    let odd = pairs.f_select(-1, 1)?;
    let out = Tensor::f_stack(&[odd.f_neg()?, even], -1)?;
    Ok(out.f_reshape(&shape)?)
}

/// Rotary embedding on the first `cos.size(-1)` channels of each head of `x` (`[B, H, T, D]`);
/// the rest pass through. `cos`/`sin` are `[B, 1, T, rotary]`, laid out for the rotation style
/// (halves, or each frequency twice for interleaved pairs), in the compute dtype, or in f32:
/// then the rotation runs in f32 and the result is cast back to `x`'s dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let kind = x.kind();
    if cos.kind() != kind {
        let wide = x.f_to_kind(cos.kind())?;
        return Ok(rope(&wide, cos, sin, interleaved)?.f_to_kind(kind)?);
    }
    let d = x.size()[x.dim() - 1];
    let r = cos.size()[cos.dim() - 1];
    let rot = if r < d {
        x.f_narrow(-1, 0, r)?
    } else {
        x.shallow_clone()
    };
    let turned = if interleaved {
        rotate_pairs(&rot)?
    } else {
        rotate_half(&rot)?
    };
    let out = rot.f_mul(cos)?.f_add(&turned.f_mul(sin)?)?;
    if r < d {
        Ok(Tensor::f_cat(&[out, x.f_narrow(-1, r, d - r)?], -1)?)
    } else {
        Ok(out)
    }
}

/// Keys and values of `[B, KVH, S, D]` repeated `rep` times per head (grouped-query attention
/// for the eager paths, which SDPA's `enable_gqa` does not serve).
fn repeat_kv(keys: &Tensor, values: &Tensor, rep: i64) -> Result<(Tensor, Tensor)> {
    if rep == 1 {
        return Ok((keys.shallow_clone(), values.shallow_clone()));
    }
    Ok((
        keys.f_repeat_interleave_self_int(rep, Some(1), None)?,
        values.f_repeat_interleave_self_int(rep, Some(1), None)?,
    ))
}

/// Eager scores `[B, H, T, S]` with the keys `mask` (or, without one, the top-left causal rule
/// when `causal`) excludes set to `-inf`.
fn masked(scores: Tensor, mask: Option<&Tensor>, causal: bool) -> Result<Tensor> {
    let size = scores.size();
    let (t, s) = (size[2], size[3]);
    let causal_mask;
    let allowed = match (mask, causal) {
        (Some(m), _) => m,
        (None, true) => {
            causal_mask = Tensor::f_ones([t, s], (Kind::Bool, scores.device()))?.f_tril(s - t)?;
            &causal_mask
        }
        (None, false) => return Ok(scores),
    };
    Ok(scores.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?)
}

/// Scaled dot-product attention of `q` (`[B, H, T, D]`) over `keys`/`values`
/// (`[B, KVH, S, D]`). `mask` is boolean `[B, 1, T, S]` (true = attend); without one, `causal`
/// applies the top-left causal rule. Soft-capped scores take the explicit path (eager
/// attention as transformers writes it); everything else goes to SDPA.
pub fn attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    spec: &AttentionSpec,
) -> Result<Tensor> {
    let (h, kvh) = (q.size()[1], keys.size()[1]);
    let Some(cap) = spec.softcap else {
        return Ok(Tensor::f_scaled_dot_product_attention(
            q,
            keys,
            values,
            mask,
            0.0,
            causal,
            spec.scale,
            kvh != h,
        )?);
    };
    let (keys, values) = repeat_kv(keys, values, h / kvh)?;
    let scores = q
        .f_matmul(&keys.f_transpose(-2, -1)?)?
        .f_mul_scalar(spec.scale)?
        .f_div_scalar(cap)?
        .f_tanh()?
        .f_mul_scalar(cap)?;
    let scores = masked(scores, mask, causal)?;
    let probs = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
    Ok(probs.f_matmul(&values)?)
}

/// Attention with a sink per head (gpt-oss): every query's softmax also covers the head's sink
/// logit, whose share is then dropped, so the weights over the keys sum to less than one.
/// Eager as transformers writes it: scores in the compute dtype, masked with `-inf`, the row's
/// maximum subtracted, softmax in the compute dtype.
pub fn attention_with_sinks(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    spec: &AttentionSpec,
    sinks: &Tensor,
) -> Result<Tensor> {
    let (b, h, t) = (q.size()[0], q.size()[1], q.size()[2]);
    let kvh = keys.size()[1];
    let (keys, values) = repeat_kv(keys, values, h / kvh)?;
    let scores = q
        .f_matmul(&keys.f_transpose(-2, -1)?)?
        .f_mul_scalar(spec.scale)?;
    let s = keys.size()[2];
    let scores = masked(scores, mask, causal)?;
    let sink = sinks
        .f_to_kind(scores.kind())?
        .f_reshape([1, h, 1, 1])?
        .f_expand([b, h, t, 1], false)?;
    let combined = Tensor::f_cat(&[scores, sink], -1)?;
    let combined = combined.f_sub(&combined.f_amax(-1, true)?)?;
    let probs = combined
        .f_softmax(-1, combined.kind())?
        .f_narrow(-1, 0, s)?
        .f_to_kind(values.kind())?;
    Ok(probs.f_matmul(&values)?)
}

/// Attention with additive scores (ALiBi): `softmax(q·kᵀ · scale + bias)`, `bias` `[B, H, T, S]`
/// holding `-inf` where a key is masked out; softmax in f32. Eager, as the original code (the
/// scores with the bias are materialised either way).
pub fn attention_with_bias(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    bias: &Tensor,
    spec: &AttentionSpec,
) -> Result<Tensor> {
    let (h, kvh) = (q.size()[1], keys.size()[1]);
    let (keys, values) = repeat_kv(keys, values, h / kvh)?;
    // Divided by sqrt(head_dim), as the original writes it (bf16 rounds each step).
    let scores = q
        .f_matmul(&keys.f_transpose(-2, -1)?)?
        .f_div_scalar(spec.scale.recip())?
        .f_add(bias)?;
    let probs = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
    Ok(probs.f_matmul(&values)?)
}

/// The MLP activation.
pub fn activate(x: &Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::Silu => x.f_silu()?,
        Activation::GeluTanh => x.f_gelu("tanh")?,
        Activation::Gelu => x.f_gelu("none")?,
        Activation::Relu => x.f_relu()?,
        Activation::GeluNew => {
            // 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), as transformers writes it.
            let inner = x
                .f_add(&x.f_pow_tensor_scalar(3.0)?.f_mul_scalar(0.044715)?)?
                .f_mul_scalar((2.0 / std::f64::consts::PI).sqrt())?;
            x.f_mul_scalar(0.5)?
                .f_mul(&inner.f_tanh()?.f_add_scalar(1.0)?)?
        }
    })
}
