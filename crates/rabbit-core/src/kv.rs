//! The KV cache: one preallocated K and V tensor per layer on the compute device, one row per
//! live sequence, written in place at each row's own slots (no concatenation per step, no copy
//! to roll back: a row's length is simply set back).

use rabbit_models::KvShape;
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Where one sweep writes its K/V: every row at the same slots, or each row at its own.
pub enum KvSlots {
    /// Rows `0..B` write `T` positions from `slot` (no padding in the sweep).
    Uniform {
        /// First slot.
        slot: i64,
    },
    /// Rows `0..B` write at `rows`/`slots` (`[B, T]` int64); padding positions point at the
    /// scratch slot past the capacity, which no sweep attends to.
    Indexed {
        /// Row of each position.
        rows: Tensor,
        /// Slot of each position.
        slots: Tensor,
    },
}

/// K and V of one layer: `[rows, heads, capacity + 1, key_dim]` and `[.., value_dim]` (the
/// last slot is the scratch slot padding positions write to). The latent cache of multi-head
/// latent attention is one head of latent + rope key, with values of width 0 (they are read
/// from the latent).
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    /// Writes `k`/`v` (`[B, kv_heads, T, D]`) of rows `0..B` at `at`.
    pub fn write(&mut self, at: &KvSlots, k: &Tensor, v: &Tensor) -> Result<()> {
        match at {
            KvSlots::Uniform { slot } => {
                let (b, t) = (k.size()[0], k.size()[2]);
                self.k
                    .f_narrow(0, 0, b)?
                    .f_narrow(2, *slot, t)?
                    .f_copy_(k)?;
                self.v
                    .f_narrow(0, 0, b)?
                    .f_narrow(2, *slot, t)?
                    .f_copy_(v)?;
            }
            KvSlots::Indexed { rows, slots } => {
                // cache[rows, :, slots] is [B, T, kv_heads, D].
                let idx = [
                    Some(rows.shallow_clone()),
                    None,
                    Some(slots.shallow_clone()),
                ];
                let _ = self
                    .k
                    .f_index_put_(&idx, &k.f_permute([0, 2, 1, 3])?, false)?;
                let _ = self
                    .v
                    .f_index_put_(&idx, &v.f_permute([0, 2, 1, 3])?, false)?;
            }
        }
        Ok(())
    }

    /// Views of rows `0..b`, first `len` slots.
    pub fn view(&self, b: i64, len: i64) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.f_narrow(0, 0, b)?.f_narrow(2, 0, len)?,
            self.v.f_narrow(0, 0, b)?.f_narrow(2, 0, len)?,
        ))
    }
}

/// The cache of every layer for up to `rows` sequences.
pub struct KvCache {
    /// Per layer.
    pub layers: Vec<LayerKv>,
    rows: i64,
    capacity: i64,
}

impl KvCache {
    /// Bytes a cache of this shape takes (`capacity` slots per row, plus the scratch slot).
    pub fn bytes(
        layers: usize,
        batch: usize,
        shape: &KvShape,
        capacity: usize,
        elem: usize,
    ) -> u64 {
        // Saturating: a request absurd enough to overflow is refused by size, not wrapped.
        [
            layers,
            batch,
            shape.values(),
            capacity.saturating_add(1),
            elem,
        ]
        .iter()
        .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
    }

    /// Allocates the cache (fails cleanly, e.g. out of device memory).
    pub fn new(
        layers: usize,
        rows: i64,
        shape: &KvShape,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> Result<KvCache> {
        let dims = |width: usize| [rows, shape.heads as i64, capacity + 1, width as i64];
        let mut out = Vec::with_capacity(layers);
        for _ in 0..layers {
            out.push(LayerKv {
                k: Tensor::f_zeros(dims(shape.key_dim), (kind, device))?,
                v: Tensor::f_zeros(dims(shape.value_dim), (kind, device))?,
            });
        }
        Ok(KvCache {
            layers: out,
            rows,
            capacity,
        })
    }

    /// Slots per sequence.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Sequences the cache holds at most.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// The slot padding positions write to (never attended).
    pub fn scratch_slot(&self) -> i64 {
        self.capacity
    }

    /// Copies the first `len` slots of row `from` into row `to` in every layer: the scheduler
    /// keeps live sequences in rows `0..n` by moving the last one into a freed row (one row's
    /// copy per finished sequence, not a reallocation of the cache).
    pub fn move_row(&mut self, from: i64, to: i64, len: i64) -> Result<()> {
        if from == to || len == 0 {
            return Ok(());
        }
        for l in &mut self.layers {
            for t in [&mut l.k, &mut l.v] {
                let src = t.f_select(0, from)?.f_narrow(1, 0, len)?;
                t.f_select(0, to)?.f_narrow(1, 0, len)?.f_copy_(&src)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latent cache (one head, keys only, values 0 wide) writes, views and moves rows like
    /// any other.
    #[test]
    fn a_latent_cache_moves_rows() {
        let shape = KvShape {
            heads: 1,
            key_dim: 6,
            value_dim: 0,
        };
        assert_eq!(KvCache::bytes(2, 3, &shape, 4, 4), 2 * 3 * 6 * 5 * 4);
        let mut kv = KvCache::new(2, 3, &shape, 4, Kind::Float, Device::Cpu).unwrap();
        let entry = Tensor::arange(3 * 2 * 6, (Kind::Float, Device::Cpu)).reshape([3, 1, 2, 6]);
        kv.layers[1]
            .write(
                &KvSlots::Uniform { slot: 0 },
                &entry,
                &entry.narrow(-1, 0, 0),
            )
            .unwrap();
        kv.move_row(2, 0, 2).unwrap();
        let (k, v) = kv.layers[1].view(1, 2).unwrap();
        assert_eq!(v.size(), [1, 1, 2, 0]);
        assert!(k.equal(&entry.narrow(0, 2, 1)));
    }
}
