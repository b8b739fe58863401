//! The KV cache: one preallocated K and V tensor per layer on the compute device, written in
//! place at the current slot (no concatenation per step).

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// K and V of one layer: `[B, kv_heads, capacity, head_dim]` each.
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    /// Writes `k`/`v` (`[B, kv_heads, T, D]`) at `slot..slot+T`.
    pub fn write(&mut self, slot: i64, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.size()[2];
        self.k.f_narrow(2, slot, t)?.f_copy_(k)?;
        self.v.f_narrow(2, slot, t)?.f_copy_(v)?;
        Ok(())
    }

    /// Views of the first `len` slots.
    pub fn view(&self, len: i64) -> Result<(Tensor, Tensor)> {
        Ok((self.k.f_narrow(2, 0, len)?, self.v.f_narrow(2, 0, len)?))
    }
}

/// The cache of every layer for one batch.
pub struct KvCache {
    /// Per layer.
    pub layers: Vec<LayerKv>,
    capacity: i64,
}

impl KvCache {
    /// Bytes a cache of this shape takes.
    pub fn bytes(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        elem: usize,
    ) -> u64 {
        // Saturating: a request absurd enough to overflow is refused by size, not wrapped.
        [layers, batch, kv_heads, capacity, head_dim, elem]
            .iter()
            .fold(2u64, |acc, &x| acc.saturating_mul(x as u64))
    }

    /// Allocates the cache (fails cleanly, e.g. out of device memory).
    pub fn new(
        layers: usize,
        batch: i64,
        kv_heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> Result<KvCache> {
        let shape = [batch, kv_heads, capacity, head_dim];
        let mut out = Vec::with_capacity(layers);
        for _ in 0..layers {
            out.push(LayerKv {
                k: Tensor::f_zeros(shape, (kind, device))?,
                v: Tensor::f_zeros(shape, (kind, device))?,
            });
        }
        Ok(KvCache {
            layers: out,
            capacity,
        })
    }

    /// Slots per sequence.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Keeps only the batch rows in `keep` (finished sequences stop costing compute).
    pub fn retain_rows(&mut self, keep: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            l.k = l.k.f_index_select(0, keep)?;
            l.v = l.v.f_index_select(0, keep)?;
        }
        Ok(())
    }
}
