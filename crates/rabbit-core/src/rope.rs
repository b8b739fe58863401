//! RoPE cos/sin tables on the compute device, built per forward from the positions in play.

use rabbit_models::{RopeScaling, RopeSpec};
use tch::{Device, Kind, Tensor};

use crate::decoder::RopeCosSin;
use crate::error::Result;

/// Inverse frequencies on the device, refreshed for dynamic NTK as transformers does.
pub struct RopeTables {
    spec: RopeSpec,
    device: Device,
    inv_freq: Tensor,
    /// LongRoPE: the frequencies past the original length (`inv_freq` holds the short ones).
    long_inv_freq: Option<Tensor>,
    scale: f64,
    /// Dynamic NTK: the longest length the current frequencies were computed for.
    cached_len: usize,
    original_len: usize,
}

impl RopeTables {
    /// Builds the base tables.
    pub fn new(spec: &RopeSpec, device: Device) -> Result<RopeTables> {
        let original_len = match spec.scaling {
            RopeScaling::Dynamic {
                max_position_embeddings,
                ..
            } => max_position_embeddings,
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => original_max_position_embeddings,
            _ => 0,
        };
        let (inv, scale) = spec.inv_freq(original_len.max(1));
        let long_inv_freq = match spec.scaling {
            RopeScaling::LongRope { .. } => {
                let (long, _) = spec.inv_freq(original_len + 1);
                Some(Tensor::f_from_slice(&long)?.f_to_device(device)?)
            }
            _ => None,
        };
        Ok(RopeTables {
            spec: spec.clone(),
            device,
            inv_freq: Tensor::f_from_slice(&inv)?.f_to_device(device)?,
            long_inv_freq,
            scale: scale as f64,
            cached_len: original_len,
            original_len,
        })
    }

    /// Mirrors transformers' `dynamic_rope_update`: grow the base past the configured length,
    /// reset once a shorter sequence comes back.
    fn refresh(&mut self, seq_len: usize) -> Result<()> {
        if !matches!(self.spec.scaling, RopeScaling::Dynamic { .. }) {
            return Ok(());
        }
        if seq_len > self.cached_len {
            let (inv, _) = self.spec.inv_freq(seq_len);
            self.inv_freq = Tensor::f_from_slice(&inv)?.f_to_device(self.device)?;
            self.cached_len = seq_len;
        } else if seq_len < self.original_len && self.cached_len > self.original_len {
            let (inv, _) = self.spec.inv_freq(self.original_len);
            self.inv_freq = Tensor::f_from_slice(&inv)?.f_to_device(self.device)?;
            self.cached_len = self.original_len;
        }
        Ok(())
    }

    /// cos/sin `[B, 1, T, rotary]` in `kind` for `positions` `[B, T]` (int64 on the device).
    pub fn cos_sin(
        &mut self,
        positions: &Tensor,
        max_position: i64,
        kind: Kind,
    ) -> Result<RopeCosSin> {
        self.refresh(max_position as usize + 1)?;
        let pos = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
        let freqs = match &self.long_inv_freq {
            // LongRoPE picks its factors per sequence on the sequence's own length (transformers
            // decides per forward; per row, a sequence gets the same in a batch as alone).
            Some(long) => {
                let len = positions.f_amax([1i64].as_slice(), true)?.f_add_scalar(1)?;
                let is_long = len.f_gt(self.original_len as i64)?.f_unsqueeze(-1)?;
                let inv = long
                    .f_view([1, 1, -1])?
                    .f_where_self(&is_long, &self.inv_freq.f_view([1, 1, -1])?)?;
                pos.f_mul(&inv)?
            }
            None => pos.f_mul(&self.inv_freq.f_view([1, 1, -1])?)?,
        };
        // Halves layout: (f0..fn, f0..fn); interleaved pairs: (f0, f0, f1, f1, ...).
        let emb = if self.spec.interleaved {
            freqs.f_repeat_interleave_self_int(2, Some(-1), None)?
        } else {
            Tensor::f_cat(&[&freqs, &freqs], -1)?
        };
        let table = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_mul_scalar(self.scale)?
                .f_to_kind(kind)?
                .f_unsqueeze(1)?)
        };
        Ok(RopeCosSin {
            cos: table(emb.f_cos()?)?,
            sin: table(emb.f_sin()?)?,
        })
    }
}
