//! RoPE cos/sin tables on the compute device, built per forward from the positions in play.

use rabbit_models::{RopeScaling, RopeSpec};
use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// Inverse frequencies on the device, refreshed for dynamic NTK as transformers does.
pub struct RopeTables {
    spec: RopeSpec,
    device: Device,
    inv_freq: Tensor,
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
            _ => 0,
        };
        let (inv, scale) = spec.inv_freq(original_len.max(1));
        Ok(RopeTables {
            spec: spec.clone(),
            device,
            inv_freq: Tensor::f_from_slice(&inv)?.f_to_device(device)?,
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

    /// cos/sin `[B, 1, T, D]` in `kind` for `positions` `[B, T]` (int64 on the device).
    pub fn cos_sin(
        &mut self,
        positions: &Tensor,
        max_position: i64,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        self.refresh(max_position as usize + 1)?;
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq.f_view([1, 1, -1])?)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = emb
            .f_cos()?
            .f_mul_scalar(self.scale)?
            .f_to_kind(kind)?
            .f_unsqueeze(1)?;
        let sin = emb
            .f_sin()?
            .f_mul_scalar(self.scale)?
            .f_to_kind(kind)?
            .f_unsqueeze(1)?;
        Ok((cos, sin))
    }
}
