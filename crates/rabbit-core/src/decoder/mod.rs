//! A decoder layer, composed from the shared [`blocks`]: the family's
//! [`LayerProgram`](rabbit_models::LayerProgram) says how the attention and MLP blocks and their
//! norms are wired; the weights arrive per call, because they are streamed.

pub mod blocks;
mod mla;
pub mod moe;

use rabbit_models::{LayerProgram, ModelSpec, Role};
use tch::Tensor;

use crate::engine::Layout;
use crate::error::Result;
use crate::kv::LayerKv;
use crate::weights::LayerWeights;
pub use blocks::{norm, NormWeights};

/// RoPE cosines and sines of one forward, `[B, 1, T, rotary]` in the compute dtype.
pub struct RopeCosSin {
    /// Cosines.
    pub cos: Tensor,
    /// Sines.
    pub sin: Tensor,
}

/// Per-forward attention inputs shared by all layers.
pub struct AttnContext {
    /// RoPE of the full-attention layers (of every layer without a local rope); `None` for
    /// ALiBi models.
    pub rope: Option<RopeCosSin>,
    /// RoPE of the sliding-window layers when the model has a separate one (Gemma 3).
    pub local_rope: Option<RopeCosSin>,
    /// The sweep's rows: positions, padding, where K/V go.
    pub(crate) layout: Layout,
    /// Boolean mask `[B, 1, T, S]` (true = attend) for full-attention layers, when the plain
    /// causal rule is not enough (padding, past KV with T > 1).
    pub full_mask: Option<Tensor>,
    /// Mask for sliding-window layers once the window cuts (padding excluded too); `None` while
    /// the window is longer than the keys, when windowed layers use `full_mask`.
    pub window_mask: Option<Tensor>,
    /// Use SDPA's built-in causal mask (only valid with no past KV and no padding: it aligns
    /// top-left).
    pub causal: bool,
    /// ALiBi: the additive scores `[B, H, T, S]` (masking included), for every layer.
    pub alibi: Option<Tensor>,
    /// Per-query multiplier `[B, 1, T, 1]` applied after rotary (QWen's log-n).
    pub q_scale: Option<Tensor>,
}

/// The attention block of a layer: latent attention (DeepSeek) or [`self_attention`].
fn attention(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    kv: &mut LayerKv,
    ctx: &AttnContext,
    windowed: bool,
) -> Result<Tensor> {
    match &spec.mla {
        Some(m) => mla::latent_attention(spec, m, w, x, kv, ctx),
        None => self_attention(spec, w, x, kv, ctx, windowed),
    }
}

/// The attention block: projections (fused or not), q/k norms, rotary, the KV cache write, and
/// attention over the cached keys. `x` is the hidden state in the sweep's layout (packed
/// `[1, N, ·]`, or `[B, T, ·]` when every row is as wide); so is the result, after the output
/// projection.
fn self_attention(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    kv: &mut LayerKv,
    ctx: &AttnContext,
    windowed: bool,
) -> Result<Tensor> {
    let lay = &ctx.layout;
    let (b, t) = (lay.b, lay.t);
    let (h, kvh, d) = (
        spec.num_heads as i64,
        spec.num_kv_heads as i64,
        spec.head_dim as i64,
    );
    let (q, k, v) = match w.linear(Role::Qkv) {
        // One GEMM; the output splits into q, k and v.
        Some(qkv) => {
            let y = qkv.forward(x)?;
            let parts = y.f_split_with_sizes([h * d, kvh * d, kvh * d], -1)?;
            let [q, k, v]: [Tensor; 3] = parts.try_into().expect("three sizes, three parts");
            (q, k, v)
        }
        None => (
            w.req_linear(Role::Q)?.forward(x)?,
            w.req_linear(Role::K)?.forward(x)?,
            w.req_linear(Role::V)?.forward(x)?,
        ),
    };
    let mut q = lay.to_padded(&q)?.f_view([b, t, h, d])?;
    let mut k = lay.to_padded(&k)?.f_view([b, t, kvh, d])?;
    let v = lay
        .to_padded(&v)?
        .f_view([b, t, kvh, d])?
        .f_transpose(1, 2)?;
    if let (Some(qn), Some(kn)) = (w.norm(Role::QNorm), w.norm(Role::KNorm)) {
        q = norm(&q, qn, &spec.norm)?;
        k = norm(&k, kn, &spec.norm)?;
    }
    let r = match (&ctx.local_rope, windowed) {
        (Some(local), true) => Some(local),
        _ => ctx.rope.as_ref(),
    };
    let (q, k) = (q.f_transpose(1, 2)?, k.f_transpose(1, 2)?);
    let (q, k) = match r {
        Some(r) => {
            let interleaved = spec.rope.interleaved;
            (
                blocks::rope(&q, &r.cos, &r.sin, interleaved)?,
                blocks::rope(&k, &r.cos, &r.sin, interleaved)?,
            )
        }
        None => (q, k),
    };
    let q = match &ctx.q_scale {
        Some(s) => q.f_mul(s)?,
        None => q,
    };

    kv.write(&lay.kv, &k, &v)?;
    let (keys, values) = kv.view(b, lay.keys)?;
    // A window that does not cut yet leaves a windowed layer with the full layer's needs
    // (padding, past KV): falling back keeps padded rows out of its attention.
    let mask = match (windowed, &ctx.window_mask) {
        (true, Some(m)) => Some(m),
        _ => ctx.full_mask.as_ref(),
    };
    let causal = ctx.causal && mask.is_none();
    let attn = match (&ctx.alibi, w.vector(Role::Sinks)) {
        // The bias carries the mask.
        (Some(bias), _) => blocks::attention_with_bias(&q, &keys, &values, bias, &spec.attention)?,
        (None, Some(sinks)) => {
            blocks::attention_with_sinks(&q, &keys, &values, mask, causal, &spec.attention, sinks)?
        }
        (None, None) => blocks::attention(&q, &keys, &values, mask, causal, &spec.attention)?,
    };
    let attn = lay.to_packed(&attn.f_transpose(1, 2)?.f_reshape([b, t, h * d])?)?;
    w.req_linear(Role::O)?.forward(&attn)
}

/// The feed-forward block of layer: the mixture of experts of a sparse layer (its experts from
/// `experts`, or those the weights hold), else the MLP.
fn ffn(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    experts: Option<&mut dyn moe::ExpertSource>,
) -> Result<Tensor> {
    let Some(m) = spec
        .moe
        .as_ref()
        .filter(|_| w.linear(Role::Router).is_some())
    else {
        return mlp(spec, w, x);
    };
    match experts {
        Some(src) => moe::moe_forward(spec, m, w, x, src),
        None => moe::moe_forward(spec, m, w, x, &mut moe::HeldExperts(w.experts(), w.file())),
    }
}

/// The MLP block: gated (`down(act(gate) * up)`, gate and up fused or not) or plain
/// (`down(act(up))`).
fn mlp(spec: &ModelSpec, w: &LayerWeights, x: &Tensor) -> Result<Tensor> {
    let act = |t: &Tensor| blocks::activate(t, spec.activation);
    let hidden = if let Some(gu) = w.linear(Role::GateUp) {
        let y = gu.forward(x)?;
        let halves = y.f_chunk(2, -1)?;
        act(&halves[0])?.f_mul(&halves[1])?
    } else if let Some(gate) = w.linear(Role::Gate) {
        act(&gate.forward(x)?)?.f_mul(&w.req_linear(Role::Up)?.forward(x)?)?
    } else {
        act(&w.req_linear(Role::Up)?.forward(x)?)?
    };
    w.req_linear(Role::Down)?.forward(&hidden)
}

/// One decoder layer as the family's program wires it. Writes this forward's K/V into `kv` where
/// the sweep's layout says. A sparse layer whose experts are not in `w` reads them from
/// `experts` once routed.
pub fn layer_forward(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    kv: &mut LayerKv,
    ctx: &AttnContext,
    windowed: bool,
    experts: Option<&mut dyn moe::ExpertSource>,
) -> Result<Tensor> {
    let n = |t: &Tensor, role: Role| -> Result<Tensor> { norm(t, w.req_norm(role)?, &spec.norm) };
    match spec.program {
        LayerProgram::PreNorm => {
            let a = attention(spec, w, &n(x, Role::AttnNorm)?, kv, ctx, windowed)?;
            let h = x.f_add(&a)?;
            let m = ffn(spec, w, &n(&h, Role::MlpNorm)?, experts)?;
            Ok(h.f_add(&m)?)
        }
        LayerProgram::Sandwich => {
            let a = attention(spec, w, &n(x, Role::AttnNorm)?, kv, ctx, windowed)?;
            let h = x.f_add(&n(&a, Role::AttnPostNorm)?)?;
            let m = ffn(spec, w, &n(&h, Role::MlpNorm)?, experts)?;
            Ok(h.f_add(&n(&m, Role::MlpPostNorm)?)?)
        }
        LayerProgram::Parallel => {
            let normed = n(x, Role::AttnNorm)?;
            let a = attention(spec, w, &normed, kv, ctx, windowed)?;
            let m = ffn(spec, w, &normed, experts)?;
            // transformers' Phi: (attn + mlp) + residual.
            Ok(a.f_add(&m)?.f_add(x)?)
        }
    }
}
