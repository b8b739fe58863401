//! Multi-head latent attention (DeepSeek-V2/V3): what the attention block is ([`MlaSpec`]), its
//! tensor inventory, and the shape of its KV cache, which holds the compressed latent and the
//! shared rope key of each token instead of every head's keys and values.

use serde::{Deserialize, Serialize};

use crate::blocks::{Param, Role};

/// The latent attention of every layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MlaSpec {
    /// Width of the query latent (`q_lora_rank`); `None`: one `q_proj` (DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Width of the key/value latent the cache holds (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Per-head key/query channels without rotary (`qk_nope_head_dim`).
    pub qk_nope_head_dim: usize,
    /// Per-head key/query channels with rotary, the key's shared by every head
    /// (`qk_rope_head_dim`).
    pub qk_rope_head_dim: usize,
    /// Per-head value width (`v_head_dim`).
    pub v_head_dim: usize,
    /// The rope channels are stored in interleaved pairs and turned into halves before the
    /// rotation (DeepSeek-V3's `rope_interleave`); otherwise as the rope spec says.
    pub deinterleave: bool,
    /// Epsilon of the two latent norms (transformers builds them with its default, 1e-6, not
    /// `rms_norm_eps`).
    pub latent_norm_eps: f64,
}

/// The shape of one layer's KV cache per token: `heads` rows of `key_dim` key values and
/// `value_dim` value values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvShape {
    /// Cached heads.
    pub heads: usize,
    /// Values per head in the key tensor.
    pub key_dim: usize,
    /// Values per head in the value tensor (0: the keys hold everything, as the latent
    /// cache's do).
    pub value_dim: usize,
}

impl KvShape {
    /// Values per token and layer.
    pub fn values(&self) -> usize {
        self.heads * (self.key_dim + self.value_dim)
    }
}

impl MlaSpec {
    /// Query/key head width (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The latent cache: one row of `kv_lora_rank + qk_rope_head_dim` values per token (the
    /// normalised latent, then the rotated rope key); values are read from the latent.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            heads: 1,
            key_dim: self.kv_lora_rank + self.qk_rope_head_dim,
            value_dim: 0,
        }
    }

    /// The attention tensors of a layer, in checkpoint order (`attention_bias` on the query
    /// latent, the key/value latent and the output projection, as transformers builds them).
    pub fn params(&self, heads: usize, hidden: usize, bias: bool) -> Vec<Param> {
        let qk = heads * self.qk_head_dim();
        let mut out = match self.q_lora_rank {
            Some(r) => vec![
                Param::linear(Role::QA, "self_attn.q_a_proj", r, hidden, bias),
                Param::norm(Role::QANorm, "self_attn.q_a_layernorm", r, false),
                Param::linear(Role::QB, "self_attn.q_b_proj", qk, r, false),
            ],
            None => vec![Param::linear(
                Role::Q,
                "self_attn.q_proj",
                qk,
                hidden,
                false,
            )],
        };
        let (r, rope) = (self.kv_lora_rank, self.qk_rope_head_dim);
        out.push(Param::linear(
            Role::KvA,
            "self_attn.kv_a_proj_with_mqa",
            r + rope,
            hidden,
            bias,
        ));
        out.push(Param::norm(
            Role::KvANorm,
            "self_attn.kv_a_layernorm",
            r,
            false,
        ));
        out.push(Param::linear(
            Role::KvB,
            "self_attn.kv_b_proj",
            heads * (self.qk_nope_head_dim + self.v_head_dim),
            r,
            false,
        ));
        out.push(Param::linear(
            Role::O,
            "self_attn.o_proj",
            hidden,
            heads * self.v_head_dim,
            bias,
        ));
        out
    }
}
