//! One sweep over the model: attention masks, the decoder layers (resident or streamed) and the
//! head.

use std::time::Instant;

use tch::{Kind, Tensor};

use super::experts::StreamedExperts;
use super::{Engine, HeadMatrix, LayerProfile, Layout, StepInput};
use crate::decoder::{layer_forward, norm, AttnContext};
use crate::error::{CoreError, Result};
use crate::kv::KvCache;
use crate::rope::RowLengths;
use crate::weights::{LayerWeights, UnitTensors};

impl Engine {
    /// ALiBi scores `[B, H, T, S]` in the compute dtype: `slope_h · key position` (a row's
    /// keys start at slot 0, so a row scores as alone), `-inf` where `allowed` (`[B, 1, T, S]`)
    /// is false.
    fn alibi_bias(&self, keys: i64, allowed: &Tensor) -> Result<Tensor> {
        let slopes: Vec<f32> = rabbit_models::alibi_slopes(self.spec.num_heads)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let slopes = Tensor::f_from_slice(&slopes)?
            .f_to_device(self.device)?
            .f_view([1, -1, 1, 1])?;
        let keys = Tensor::f_arange(keys, (Kind::Float, self.device))?.f_view([1, 1, 1, keys])?;
        Ok(slopes
            .f_mul(&keys)?
            .f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?
            .f_to_kind(self.kind)?)
    }

    /// One sweep over the whole model: every row of `input` (row `i` is row `i` of `kv`) adds
    /// its new positions to its cache. Returns float32 logits `[M, V]` for the positions
    /// `input` asks for, in row order.
    pub fn forward(&mut self, input: &StepInput, kv: &mut KvCache) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let lay = Layout::new(input, kv.scratch_slot(), self.device)?;
        if lay.b > kv.rows() || lay.keys > kv.capacity() {
            return Err(CoreError::InvalidInput(format!(
                "the sweep needs {} row(s) of {} slots; the KV cache has {} of {}",
                lay.b,
                lay.keys,
                kv.rows(),
                kv.capacity()
            )));
        }
        let (b, t) = (lay.b, lay.t);
        let counts = self.profile.counts();
        let decode = input.positions() == input.rows() as i64;
        let head_start = Instant::now();
        let mut h = match &self.embed {
            HeadMatrix::Resident(w) => Tensor::f_embedding(w, &input.ids, -1, false, false)?,
            HeadMatrix::Mapped(m, _) => m.embed(&input.ids, self.device, self.kind)?,
        };
        if lay.uniform {
            h = h.f_view([b, t, -1])?;
        }
        if let Some(s) = &self.embed_scale {
            h = h.f_mul(s)?;
        }
        let rows = RowLengths {
            seq: &input.seq_lens,
            prompt: &input.prompt_lens,
        };
        let alibi = self.spec.attention.alibi;
        // ALiBi models have no rotary embedding.
        let rope = if alibi {
            None
        } else {
            Some(self.rope.cos_sin(&lay.positions, &rows, self.kind)?)
        };
        let local_rope = match self.local_rope.as_ref() {
            Some(r) => Some(r.cos_sin(&lay.positions, &rows, self.kind)?),
            None => None,
        };
        // Uniform rows need no mask for a first chunk (SDPA's causal rule) or one token each
        // (every cached key is visible); anything else does.
        let past0 = input.past[0];
        let needs_full = !(lay.uniform && (past0 == 0 || t == 1));
        let full_mask = if needs_full || alibi {
            Some(lay.mask(input, None, self.device)?)
        } else {
            None
        };
        let alibi_bias = match (&full_mask, alibi) {
            (Some(m), true) => Some(self.alibi_bias(lay.keys, m)?),
            _ => None,
        };
        let q_scale = match self.spec.attention.logn_length {
            Some(n) => Some(logn_scale(&lay.positions, n, self.kind)?),
            None => None,
        };
        // The window only cuts once a query is `w` or more slots past the first key; before
        // that a windowed layer needs exactly what a full one does (decoder falls back to it).
        let window_mask = match self.window {
            Some(w) if lay.keys > w as i64 => Some(lay.mask(input, Some(w), self.device)?),
            _ => None,
        };
        let causal = lay.uniform && past0 == 0 && t > 1;
        let ctx = AttnContext {
            rope,
            local_rope,
            layout: lay,
            full_mask,
            window_mask,
            causal,
            alibi: alibi_bias,
            q_scale,
        };
        let multi = input.positions() > input.rows() as i64;
        // A sweep of a few positions applies compressed weights as stored (crate::qgemv).
        let packed = input.positions() <= crate::qgemv::MAX_DIRECT_ROWS as i64
            && crate::qgemv::direct_available();
        let mut head_time = head_start.elapsed();

        for i in 0..self.layers.len() {
            // Per layer, so that a long sweep (a prefill) adapts within itself.
            crate::threads::tick();
            if let Some(x) = self.experts.as_mut() {
                // Start reading the next layer's likely experts while this one computes.
                x.guess_ahead(&self.spec, i + 1, &h, &mut self.profile)?;
            }
            let windowed = self.spec.sliding_windows[i].is_some();
            if self.profile.layers.len() != self.layers.len() {
                self.profile.layers = self
                    .resident
                    .iter()
                    .map(|r| LayerProfile {
                        resident: r.is_some(),
                        ..Default::default()
                    })
                    .collect();
            }
            if let Some(w) = &self.resident[i] {
                let compute = Instant::now();
                let mut expert_io = 0.0;
                // A resident dense part whose routed experts stream.
                h = match self.experts.as_mut().filter(|x| x.layers[i].is_some()) {
                    Some(streams) => {
                        let mut src = StreamedExperts::new(
                            streams,
                            i,
                            &self.spec,
                            self.device,
                            self.kind,
                            packed,
                            &self.row_orders,
                            &mut self.dequant_buffers,
                            &mut self.profile,
                        );
                        let out = layer_forward(
                            &self.spec,
                            w,
                            &h,
                            &mut kv.layers[i],
                            &ctx,
                            windowed,
                            Some(&mut src),
                        );
                        expert_io = src.finish();
                        out?
                    }
                    None => {
                        layer_forward(&self.spec, w, &h, &mut kv.layers[i], &ctx, windowed, None)?
                    }
                };
                let dt = compute.elapsed().as_secs_f64() - expert_io;
                self.profile.compute_s += dt;
                self.profile.layers[i].compute_s += dt;
                if let (true, Some(hook)) = (multi, self.on_prefill_layer.as_mut()) {
                    hook(i + 1, self.layers.len());
                }
                continue;
            }
            let (Some(reader), Some(slot)) = (self.reader.as_mut(), self.stream_slot[i]) else {
                return Err(CoreError::Reader(format!(
                    "layer {i} is neither resident nor streamed"
                )));
            };
            let (unit, wait) = reader.next(slot)?;
            let n = unit.bytes_read;
            self.profile.read_wait_s += wait.as_secs_f64();
            self.profile.read_s += unit.read_time.as_secs_f64();
            self.profile.bytes_streamed += n;
            self.profile.active_bytes += n;
            self.profile.layers_streamed += 1;
            let lp = &mut self.profile.layers[i];
            lp.read_wait_s += wait.as_secs_f64();
            lp.read_s += unit.read_time.as_secs_f64();
            lp.bytes += n;
            let result = (|| {
                let stage = Instant::now();
                let tensors = UnitTensors::from_unit_bytes(
                    &self.layers[i],
                    &unit.bytes,
                    self.device,
                    self.kind,
                    self.spec.fp8_block,
                    Some(&mut self.dequant_buffers),
                    &self.row_orders,
                    packed,
                )?;
                let dequant = tensors.dequant_s;
                self.profile.packed_weights += tensors.packed_len() as u64;
                let by_expert = self.experts.as_ref().is_some_and(|x| x.layers[i].is_some());
                let w = LayerWeights::from_unit_parts(&self.spec, i, tensors, !by_expert)?;
                let staged = stage.elapsed().as_secs_f64() - dequant;
                self.profile.dequant_s += dequant;
                self.profile.layers[i].dequant_s += dequant;
                self.profile.stage_s += staged;
                self.profile.layers[i].stage_s += staged;
                let compute = Instant::now();
                let mut expert_io = 0.0;
                let out = match self.experts.as_mut().filter(|_| by_expert) {
                    Some(streams) => {
                        let mut src = StreamedExperts::new(
                            streams,
                            i,
                            &self.spec,
                            self.device,
                            self.kind,
                            packed,
                            &self.row_orders,
                            &mut self.dequant_buffers,
                            &mut self.profile,
                        );
                        let out = layer_forward(
                            &self.spec,
                            &w,
                            &h,
                            &mut kv.layers[i],
                            &ctx,
                            windowed,
                            Some(&mut src),
                        );
                        expert_io = src.finish();
                        out
                    }
                    None => {
                        layer_forward(&self.spec, &w, &h, &mut kv.layers[i], &ctx, windowed, None)
                    }
                };
                let dt = compute.elapsed().as_secs_f64() - expert_io;
                self.profile.compute_s += dt;
                self.profile.layers[i].compute_s += dt;
                // The layer is computed: nothing references its weights any more.
                self.dequant_buffers.reclaim(w.into_tensors());
                out
            })();
            // The weights (which may alias the bytes) are gone; the bytes can be recycled.
            if let Some(reader) = self.reader.as_ref() {
                reader.recycle(slot, unit.bytes);
            }
            // Own memory after every streamed layer: a copy made per layer would show here.
            crate::memory::sample_anon();
            h = result?;
            if let (true, Some(hook)) = (multi, self.on_prefill_layer.as_mut()) {
                hook(i + 1, self.layers.len());
            }
        }

        if decode {
            self.profile.add_decode(counts);
        }
        let head_start = Instant::now();
        if input.logits_at.is_empty() {
            // A prefill chunk that does not end its prompt: no head at all (a mapped head would
            // be read for nothing).
            self.profile.head_s += head_time.as_secs_f64();
            let vocab = self.spec.vocab_size as i64;
            return Ok(Tensor::f_zeros([0, vocab], (Kind::Float, self.device))?);
        }
        // Only the positions asked for go through the norm and the head.
        let width = h.size()[h.dim() - 1];
        let at = Tensor::f_from_slice(&input.logits_at)?.f_to_device(self.device)?;
        let h = h
            .f_reshape([-1, width])?
            .f_index_select(0, &at)?
            .f_unsqueeze(0)?;
        let h = norm(&h, &self.norm, &self.spec.norm)?;
        let mut logits = match &self.lm_head {
            HeadMatrix::Resident(w) => h.f_linear(w, self.lm_head_bias.as_ref())?,
            HeadMatrix::Mapped(m, rows) => {
                let l =
                    m.linear_chunked(&h, *rows, self.device, self.kind, self.spec.lm_head_norm)?;
                match &self.lm_head_bias {
                    Some(b) => l.f_add(b)?,
                    None => l,
                }
            }
        };
        if let Some(cap) = self.spec.final_logit_softcap {
            // In the compute dtype, as transformers does (Gemma 2).
            logits = logits.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?;
        }
        let logits = logits.f_to_kind(Kind::Float)?.f_squeeze_dim(0)?;
        head_time += head_start.elapsed();
        self.profile.head_s += head_time.as_secs_f64();
        crate::memory::sample_anon();
        Ok(logits)
    }
}

/// QWen's log-n query scale `[B, 1, T, 1]` in `kind`: `ln(p + 1) / ln(n)` for a query at
/// position `p` past the training length `n`, else 1 (computed in f64 and rounded to f32, as
/// the original's table of Python floats).
fn logn_scale(positions: &Tensor, n: usize, kind: Kind) -> Result<Tensor> {
    let p1 = positions.f_to_kind(Kind::Double)?.f_add_scalar(1.0)?;
    let scale = p1.f_log()?.f_div_scalar((n as f64).ln())?;
    let past = p1.f_gt(n as f64)?;
    let one = Tensor::f_ones_like(&scale)?;
    Ok(scale
        .f_where_self(&past, &one)?
        .f_to_kind(Kind::Float)?
        .f_to_kind(kind)?
        .f_unsqueeze(1)?
        .f_unsqueeze(-1)?)
}
