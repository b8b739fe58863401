//! The shared decoder layer of the Llama lineage, written once. Family differences arrive as
//! flags of [`ModelSpec`] (q/k/v bias, q/k norm, sliding window) and as the RoPE tables; the
//! weights arrive per call, because they are streamed.

use rabbit_models::ModelSpec;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::kv::LayerKv;
use crate::weights::LayerWeights;

/// RMSNorm exactly as transformers computes it: normalise in f32, cast back to the input dtype,
/// then scale by the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let kind = x.kind();
    let xf = x.f_to_kind(Kind::Float)?;
    let var = xf
        .f_pow_tensor_scalar(2)?
        .f_mean_dim(-1, true, Kind::Float)?;
    let normed = xf.f_mul(&var.f_add_scalar(eps)?.f_rsqrt()?)?;
    Ok(weight.f_mul(&normed.f_to_kind(kind)?)?)
}

/// `[x1, x2] -> [-x2, x1]` on the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], -1)?)
}

/// Applies rotary embeddings; `cos`/`sin` are `[B, 1, T, D]` in the compute dtype.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?)
}

/// Per-forward attention inputs shared by all layers.
pub struct AttnContext {
    /// RoPE cosines `[B, 1, T, D]`.
    pub cos: Tensor,
    /// RoPE sines `[B, 1, T, D]`.
    pub sin: Tensor,
    /// Cache slot where this forward's first token goes.
    pub slot: i64,
    /// Boolean mask `[B, 1, T, S]` (true = attend) for full-attention layers, when the plain
    /// causal rule is not enough (padding, past KV with T > 1).
    pub full_mask: Option<Tensor>,
    /// Mask for sliding-window layers once the window cuts (padding excluded too); `None` while
    /// the window is longer than the keys, when windowed layers use `full_mask`.
    pub window_mask: Option<Tensor>,
    /// Use SDPA's built-in causal mask (only valid with no past KV: it aligns top-left).
    pub causal: bool,
}

/// One decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`. Writes this forward's K/V
/// into `kv` at `ctx.slot`.
pub fn layer_forward(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    kv: &mut LayerKv,
    ctx: &AttnContext,
    windowed: bool,
) -> Result<Tensor> {
    let (b, t) = (x.size()[0], x.size()[1]);
    let (h, kvh, d) = (
        spec.num_heads as i64,
        spec.num_kv_heads as i64,
        spec.head_dim as i64,
    );
    let eps = spec.rms_norm_eps;

    let normed = rms_norm(x, &w.input_norm, eps)?;
    let mut q = w.q.forward(&normed)?.f_view([b, t, h, d])?;
    let mut k = w.k.forward(&normed)?.f_view([b, t, kvh, d])?;
    let v =
        w.v.forward(&normed)?
            .f_view([b, t, kvh, d])?
            .f_transpose(1, 2)?;
    if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
        q = rms_norm(&q, qn, eps)?;
        k = rms_norm(&k, kn, eps)?;
    }
    let q = apply_rope(&q.f_transpose(1, 2)?, &ctx.cos, &ctx.sin)?;
    let k = apply_rope(&k.f_transpose(1, 2)?, &ctx.cos, &ctx.sin)?;

    kv.write(ctx.slot, &k, &v)?;
    let (keys, values) = kv.view(ctx.slot + t)?;
    // A window that does not cut yet leaves a windowed layer with the full layer's needs
    // (padding, past KV): falling back keeps padded rows out of its attention.
    let mask = match (windowed, &ctx.window_mask) {
        (true, Some(m)) => Some(m),
        _ => ctx.full_mask.as_ref(),
    };
    let causal = ctx.causal && mask.is_none();
    let attn = Tensor::f_scaled_dot_product_attention(
        &q,
        &keys,
        &values,
        mask,
        0.0,
        causal,
        1.0 / (d as f64).sqrt(),
        kvh != h,
    )?;
    let attn = attn.f_transpose(1, 2)?.f_reshape([b, t, h * d])?;
    let hidden = x.f_add(&w.o.forward(&attn)?)?;

    let normed = rms_norm(&hidden, &w.post_norm, eps)?;
    let act = w
        .gate
        .forward(&normed)?
        .f_silu()?
        .f_mul(&w.up.forward(&normed)?)?;
    Ok(hidden.f_add(&w.down.forward(&act)?)?)
}
