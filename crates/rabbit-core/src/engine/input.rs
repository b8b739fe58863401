//! What one sweep computes: for every live row of the cache, any number of new positions (a
//! prefill chunk, one decode token, a token and its drafts to verify), each row at its own
//! position, and which positions need logits.
//!
//! Rows carry different numbers of positions, so the hidden state travels packed (`[1, N, ·]`,
//! the real positions only: the projections and MLPs never compute padding); attention unpacks
//! it to `[B, T, ·]` with each row right-padded, masks the padding, and packs it back.

use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::kv::KvSlots;

/// Which positions of a row need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that does not end the prompt).
    None,
    /// The last new position.
    Last,
    /// Every new position (verifying drafts, scoring a prompt).
    All,
}

/// One row's part of a sweep. Row `i` of the sweep is row `i` of the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct RowInput<'a> {
    /// The new tokens; a row may have none in a sweep (it only keeps its place), but some row
    /// must have one.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache: the first new token's position and slot.
    pub past: usize,
    /// The sequence's prompt length (QWen's NTK scaling is decided by it).
    pub prompt_len: usize,
    /// Which logits to return.
    pub logits: Logits,
}

/// One sweep's inputs, built by [`StepInput::new`].
pub struct StepInput {
    /// Every row's new tokens, packed `[1, N]` on the device.
    pub(crate) ids: Tensor,
    /// Per row: tokens already cached.
    pub(crate) past: Vec<i64>,
    /// Per row: new tokens.
    pub(crate) new: Vec<i64>,
    /// Per row: its length after this sweep (what length-dependent RoPE scalings see).
    pub(crate) seq_lens: Vec<usize>,
    /// Per row: its prompt length.
    pub(crate) prompt_lens: Vec<usize>,
    /// Packed indices of the positions whose logits are returned, in row order.
    pub(crate) logits_at: Vec<i64>,
}

impl StepInput {
    /// Builds a sweep over rows `0..rows.len()` of the cache.
    pub fn new(rows: &[RowInput<'_>], device: Device) -> Result<StepInput> {
        if rows.is_empty() {
            return Err(CoreError::InvalidInput(
                "a sweep needs at least one row".into(),
            ));
        }
        let mut ids = Vec::new();
        let mut logits_at = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            if r.tokens.is_empty() && r.logits != Logits::None {
                return Err(CoreError::InvalidInput(format!(
                    "row {i} of the sweep asks for logits of no token"
                )));
            }
            let start = ids.len() as i64;
            let n = r.tokens.len() as i64;
            match r.logits {
                Logits::None => {}
                Logits::Last => logits_at.push(start + n - 1),
                Logits::All => logits_at.extend(start..start + n),
            }
            ids.extend(r.tokens.iter().map(|&t| t as i64));
        }
        let n = ids.len() as i64;
        if n == 0 {
            return Err(CoreError::InvalidInput(
                "a sweep needs at least one token".into(),
            ));
        }
        Ok(StepInput {
            ids: Tensor::f_from_slice(&ids)?
                .f_view([1, n])?
                .f_to_device(device)?,
            past: rows.iter().map(|r| r.past as i64).collect(),
            new: rows.iter().map(|r| r.tokens.len() as i64).collect(),
            seq_lens: rows.iter().map(|r| r.past + r.tokens.len()).collect(),
            prompt_lens: rows.iter().map(|r| r.prompt_len).collect(),
            logits_at,
        })
    }

    /// Rows in the sweep.
    pub fn rows(&self) -> usize {
        self.past.len()
    }

    /// Logit rows the sweep returns.
    pub fn logit_count(&self) -> usize {
        self.logits_at.len()
    }

    /// New positions over all rows.
    pub fn positions(&self) -> i64 {
        self.new.iter().sum()
    }
}

/// The padded view of a sweep, derived once per forward.
pub(crate) struct Layout {
    /// Rows.
    pub b: i64,
    /// Widest row.
    pub t: i64,
    /// Every row has `t` new positions after the same `past`: packed and padded coincide and
    /// the plain causal rules apply.
    pub uniform: bool,
    /// Keys attended: the longest row after this sweep.
    pub keys: i64,
    /// Positions `[B, T]` (padding repeats its row's last position).
    pub positions: Tensor,
    /// Padded `[B*T]` → packed index (padding takes its row's last real position), and packed
    /// `[N]` → padded index; `None` when uniform.
    pub unpack: Option<(Tensor, Tensor)>,
    /// Where K/V go.
    pub kv: KvSlots,
}

impl Layout {
    pub fn new(input: &StepInput, scratch_slot: i64, device: Device) -> Result<Layout> {
        let b = input.past.len() as i64;
        let t = input.new.iter().copied().max().unwrap_or(1);
        let uniform =
            input.new.iter().all(|&n| n == t) && input.past.iter().all(|&p| p == input.past[0]);
        let keys = input
            .past
            .iter()
            .zip(&input.new)
            .map(|(p, n)| p + n)
            .max()
            .unwrap_or(1);
        let mut positions = Vec::with_capacity((b * t) as usize);
        for (&p, &n) in input.past.iter().zip(&input.new) {
            positions.extend((0..t).map(|j| p + j.min(n - 1).max(0)));
        }
        let int = |v: &[i64], shape: &[i64]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(v)?
                .f_view(shape)?
                .f_to_device(device)?)
        };
        let positions_t = int(&positions, &[b, t])?;
        if uniform {
            return Ok(Layout {
                b,
                t,
                uniform,
                keys,
                positions: positions_t,
                unpack: None,
                kv: KvSlots::Uniform {
                    slot: input.past[0],
                },
            });
        }
        let (mut gather, mut pack, mut rows, mut slots) = (vec![], vec![], vec![], vec![]);
        let mut start = 0i64;
        for (i, (&p, &n)) in input.past.iter().zip(&input.new).enumerate() {
            for j in 0..t {
                gather.push(if n > 0 { start + j.min(n - 1) } else { 0 });
                rows.push(i as i64);
                slots.push(if j < n { p + j } else { scratch_slot });
            }
            pack.extend((0..n).map(|j| i as i64 * t + j));
            start += n;
        }
        Ok(Layout {
            b,
            t,
            uniform,
            keys,
            positions: positions_t,
            unpack: Some((int(&gather, &[b * t])?, int(&pack, &[start])?)),
            kv: KvSlots::Indexed {
                rows: int(&rows, &[b, t])?,
                slots: int(&slots, &[b, t])?,
            },
        })
    }

    /// Boolean mask `[B, 1, T, keys]` (true = attend): a real query sees its row's keys up to
    /// its own position (within `window` when given); a padding query sees key 0 only, so no
    /// row of the softmax is empty.
    pub fn mask(&self, input: &StepInput, window: Option<usize>, device: Device) -> Result<Tensor> {
        let (b, t, s) = (self.b, self.t, self.keys);
        let opts = (Kind::Int64, device);
        let q = self.positions.f_view([b, t, 1])?;
        let k = Tensor::f_arange(s, opts)?.f_view([1, 1, s])?;
        let new = Tensor::f_from_slice(&input.new)?
            .f_to_device(device)?
            .f_view([b, 1, 1])?;
        let real = Tensor::f_arange(t, opts)?
            .f_view([1, t, 1])?
            .f_lt_tensor(&new)?;
        let mut seen = k.f_le_tensor(&q)?;
        if let Some(w) = window {
            seen = seen.f_logical_and(&q.f_sub(&k)?.f_lt(w as i64)?)?;
        }
        let pad_sees = k.f_eq(0)?.f_logical_and(&real.f_logical_not()?)?;
        Ok(seen
            .f_logical_and(&real)?
            .f_logical_or(&pad_sees)?
            .f_unsqueeze(1)?)
    }

    /// `[B*T or N, ·]` packed rows → `[B, T, ·]`.
    pub fn to_padded(&self, x: &Tensor) -> Result<Tensor> {
        let width = x.size()[x.dim() - 1];
        let flat = x.f_reshape([-1, width])?;
        let flat = match &self.unpack {
            Some((gather, _)) => flat.f_index_select(0, gather)?,
            None => flat,
        };
        Ok(flat.f_view([self.b, self.t, width])?)
    }

    /// `[B, T, ·]` → the hidden state's layout (`[1, N, ·]`, or `[B, T, ·]` when uniform).
    pub fn to_packed(&self, x: &Tensor) -> Result<Tensor> {
        match &self.unpack {
            Some((_, pack)) => {
                let width = x.size()[x.dim() - 1];
                Ok(x.f_reshape([-1, width])?
                    .f_index_select(0, pack)?
                    .f_unsqueeze(0)?)
            }
            None => Ok(x.shallow_clone()),
        }
    }
}
