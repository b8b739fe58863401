//! RoPE cos/sin tables on the compute device, built per forward from the positions in play.
//!
//! Scalings whose frequencies depend on a sequence's length (dynamic NTK, LongRoPE, QWen's
//! NTK) get them per row, from that row's own length: a sequence is rotated the same in a batch
//! as alone, whatever the others' lengths.

use rabbit_models::{RopeScaling, RopeSpec};
use tch::{Device, Kind, Tensor};

use crate::decoder::RopeCosSin;
use crate::error::Result;

/// The lengths a forward's frequencies may depend on, per row.
pub struct RowLengths<'a> {
    /// Each row's length up to and including this forward's last token.
    pub seq: &'a [usize],
    /// Each row's prompt length (what its prefill saw).
    pub prompt: &'a [usize],
}

/// Inverse frequencies on the device.
pub struct RopeTables {
    spec: RopeSpec,
    device: Device,
    /// The frequencies when they do not depend on the sequence.
    inv_freq: Tensor,
    scale: f64,
}

impl RopeTables {
    /// Builds the base tables.
    pub fn new(spec: &RopeSpec, device: Device) -> Result<RopeTables> {
        let (inv, scale) = spec.inv_freq(1);
        Ok(RopeTables {
            spec: spec.clone(),
            device,
            inv_freq: Tensor::f_from_slice(&inv)?.f_to_device(device)?,
            scale: scale as f64,
        })
    }

    /// The length that decides a row's frequencies, when the scaling has one: its current
    /// length (dynamic NTK grows the base past the configured length, as transformers'
    /// `dynamic_rope_update` and InternLM2's code do; LongRoPE switches factors past the
    /// original length), or its prompt length (QWen: decided at prefill, kept while decoding).
    fn deciding_length(&self, seq: usize, prompt: usize) -> Option<usize> {
        match self.spec.scaling {
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. } => Some(seq),
            RopeScaling::QwenNtk { .. } => Some(prompt),
            _ => None,
        }
    }

    /// Whether a row of prompt length `prompt` is rotated with the same frequencies at lengths
    /// `a` and `b`: then a sweep reaching length `b` computes its positions exactly as sweeps
    /// ending at each length in between would (chunked prefill, verifying drafts).
    pub fn same_frequencies(&self, a: usize, b: usize, prompt: usize) -> bool {
        match (
            self.deciding_length(a, prompt),
            self.deciding_length(b, prompt),
        ) {
            (Some(x), Some(y)) => x == y || self.spec.inv_freq(x) == self.spec.inv_freq(y),
            _ => true,
        }
    }

    /// `[B, 1, dim/2]` frequencies for the rows, or the shared `[1, 1, dim/2]` ones.
    fn frequencies(&self, rows: &RowLengths<'_>) -> Result<Tensor> {
        let per_row: Option<Vec<usize>> = rows
            .seq
            .iter()
            .zip(rows.prompt)
            .map(|(&s, &p)| self.deciding_length(s, p))
            .collect();
        match per_row {
            Some(lens) if !lens.is_empty() => {
                let mut flat = Vec::with_capacity(lens.len() * self.spec.dim / 2);
                for &len in &lens {
                    flat.extend(self.spec.inv_freq(len).0);
                }
                Ok(Tensor::f_from_slice(&flat)?
                    .f_to_device(self.device)?
                    .f_view([lens.len() as i64, 1, -1])?)
            }
            _ => Ok(self.inv_freq.f_view([1, 1, -1])?),
        }
    }

    /// cos/sin `[B, 1, T, rotary]` in `kind` (f32 for a spec that rotates in f32) for
    /// `positions` `[B, T]` (int64 on the device).
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        rows: &RowLengths<'_>,
        kind: Kind,
    ) -> Result<RopeCosSin> {
        let kind = if self.spec.rotate_f32 {
            Kind::Float
        } else {
            kind
        };
        let pos = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
        let freqs = pos.f_mul(&self.frequencies(rows)?)?;
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
