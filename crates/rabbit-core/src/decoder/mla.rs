//! Multi-head latent attention (DeepSeek-V2/V3), written once for both: the query through its
//! latent (or one `q_proj`), the key/value latent normalised and cached with the rotated rope
//! key (`kv_lora_rank + qk_rope_head_dim` values per token, not every head's keys and values),
//! and attention over the cache.
//!
//! Prefill expands the cached latent into every head's keys and values as transformers does.
//! A decode step (one query per row) folds `kv_b_proj` into the query and the output instead,
//! attending over the latent itself: per step it touches the cache once rather than
//! re-expanding every cached token through `kv_b_proj` (the same sums in another order: equal
//! in f32 to rounding, not bit for bit; in bf16 the latent query is rounded where the expanded
//! keys would be).

use rabbit_models::{MlaSpec, ModelSpec, Norm, Role};
use tch::Tensor;

use super::{blocks, norm, AttnContext};
use crate::error::Result;
use crate::kv::LayerKv;
use crate::weights::{LayerWeights, LinearWeight};

/// `[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]` on the last dimension: DeepSeek-V3's
/// interleaved rope pairs as the halves `rotate_half` turns.
fn deinterleave(x: &Tensor) -> Result<Tensor> {
    let d = x.size()[x.dim() - 1];
    Ok(x.f_unflatten(-1, [d / 2, 2])?
        .f_transpose(-1, -2)?
        .f_flatten(-2, -1)?)
}

/// The attention block of a latent-attention layer on `x` (the sweep's layout, as
/// `self_attention`'s), writing this sweep's latents into `kv`.
pub(super) fn latent_attention(
    spec: &ModelSpec,
    mla: &MlaSpec,
    w: &LayerWeights,
    x: &Tensor,
    kv: &mut LayerKv,
    ctx: &AttnContext,
) -> Result<Tensor> {
    let lay = &ctx.layout;
    let (b, t) = (lay.b, lay.t);
    let h = spec.num_heads as i64;
    let (nope, rope) = (mla.qk_nope_head_dim as i64, mla.qk_rope_head_dim as i64);
    let (rank, vd) = (mla.kv_lora_rank as i64, mla.v_head_dim as i64);
    let latent_norm = Norm {
        kind: spec.norm.kind,
        eps: mla.latent_norm_eps,
    };

    let q = match w.linear(Role::QB) {
        Some(qb) => {
            let lat = w.req_linear(Role::QA)?.forward(x)?;
            qb.forward(&norm(&lat, w.req_norm(Role::QANorm)?, &latent_norm)?)?
        }
        None => w.req_linear(Role::Q)?.forward(x)?,
    };
    let q = lay
        .to_padded(&q)?
        .f_view([b, t, h, nope + rope])?
        .f_transpose(1, 2)?;
    let (q_nope, mut q_pe) = (q.f_narrow(-1, 0, nope)?, q.f_narrow(-1, nope, rope)?);
    let compressed = lay.to_padded(&w.req_linear(Role::KvA)?.forward(x)?)?;
    let latent = norm(
        &compressed.f_narrow(-1, 0, rank)?,
        w.req_norm(Role::KvANorm)?,
        &latent_norm,
    )?;
    let mut k_pe = compressed.f_narrow(-1, rank, rope)?.f_unsqueeze(1)?;
    if mla.deinterleave {
        q_pe = deinterleave(&q_pe)?;
        k_pe = deinterleave(&k_pe)?;
    }
    if let Some(r) = &ctx.rope {
        let interleaved = spec.rope.interleaved;
        q_pe = blocks::rope(&q_pe, &r.cos, &r.sin, interleaved)?;
        k_pe = blocks::rope(&k_pe, &r.cos, &r.sin, interleaved)?;
    }

    // The cache row of a token: its normalised latent, then its rotated rope key.
    let entry = Tensor::f_cat(&[latent.f_unsqueeze(1)?, k_pe], -1)?;
    kv.write(&lay.kv, &entry, &entry.f_narrow(-1, 0, 0)?)?;
    let (cached, _) = kv.view(b, lay.keys)?;
    let mask = ctx.full_mask.as_ref();
    let causal = ctx.causal && mask.is_none();
    let kv_b = w.req_linear(Role::KvB)?;

    let out = match &kv_b.weight {
        LinearWeight::Dense(wkv) if t == 1 && kv_b.bias.is_none() => {
            // Absorbed: q·k_nope = (q W_uk)·latent, and attn·v = (attn·latent) W_uvᵀ.
            let wkv = wkv.f_view([h, nope + vd, rank])?;
            let q_lat = q_nope.f_matmul(&wkv.f_narrow(1, 0, nope)?)?;
            // The heads become query rows of one head (t is 1): SDPA then attends the one
            // latent head as it is, where a grouped call would copy it to every head. The
            // single query sees every cached key (causal only arises with one key).
            let query = Tensor::f_cat(&[q_lat, q_pe], -1)?.f_transpose(1, 2)?;
            let values = cached.f_narrow(-1, 0, rank)?;
            let ctx_lat =
                blocks::attention(&query, &cached, &values, mask, false, &spec.attention)?
                    .f_transpose(1, 2)?;
            ctx_lat.f_matmul(&wkv.f_narrow(1, nope, vd)?.f_transpose(1, 2)?)?
        }
        _ => {
            let s = cached.size()[2];
            let heads = kv_b
                .forward(&cached.f_narrow(-1, 0, rank)?)?
                .f_view([b, s, h, nope + vd])?
                .f_transpose(1, 2)?;
            let k_rot = cached
                .f_narrow(-1, rank, rope)?
                .f_expand([b, h, s, rope], false)?;
            let keys = Tensor::f_cat(&[heads.f_narrow(-1, 0, nope)?, k_rot], -1)?;
            let values = heads.f_narrow(-1, nope, vd)?;
            let query = Tensor::f_cat(&[q_nope, q_pe], -1)?;
            blocks::attention(&query, &keys, &values, mask, causal, &spec.attention)?
        }
    };
    let out = lay.to_packed(&out.f_transpose(1, 2)?.f_reshape([b, t, h * vd])?)?;
    w.req_linear(Role::O)?.forward(&out)
}
