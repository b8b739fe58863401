//! Batched generation on top of [`Engine::forward`]: left-padded prefill of every prompt in one
//! sweep per layer, then one token per live sequence per sweep. Finished sequences leave the batch
//! (their KV rows are dropped) so they stop costing compute.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::engine::{Engine, StepInput};
use crate::error::{CoreError, Result};
use crate::kv::KvCache;
use crate::sampling::{Sampler, SamplingParams};
use crate::stats::median;
use rabbit_models::RopeScaling;

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// One prompt (token ids) per sequence; several make a batch.
    pub sequences: Vec<Vec<u32>>,
    /// Upper bound of new tokens per sequence.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Stop ids (usually the model's eos ids).
    pub eos_token_ids: Vec<u32>,
    /// Keep the raw float32 logits of every step (for `--dump-logits` and tests).
    pub keep_logits: bool,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_new_tokens reached.
    Length,
    /// An eos id was produced.
    Eos,
    /// The caller's callback asked to stop this sequence (e.g. a stop string matched).
    Stop,
    /// The caller cancelled the whole generation.
    Cancelled,
}

/// The caller's answer to each new token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Finish this sequence now (the token is kept).
    StopSequence,
    /// Stop every sequence now.
    Cancel,
}

/// One newly generated token.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    /// Index of the sequence in the request.
    pub sequence: usize,
    /// The token.
    pub token: u32,
    /// 0 for the first new token.
    pub step: usize,
}

/// Result for one sequence.
#[derive(Debug, Clone)]
pub struct SequenceOutput {
    /// The prompt.
    pub input_ids: Vec<u32>,
    /// Only the new tokens.
    pub output_ids: Vec<u32>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// `[new tokens, vocab]` float32 row-major, when requested: row 0 is the logits at the last
    /// prompt position, row k those of decode step k.
    pub logits: Option<Vec<f32>>,
}

/// Wall-clock figures of one generate call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Prompt tokens processed (sum over sequences, without padding).
    pub prefill_tokens: usize,
    /// Time of the prefill sweep (includes choosing the first token).
    pub prefill_s: f64,
    /// Prefill throughput.
    pub prefill_tokens_per_s: f64,
    /// Decode sweeps run.
    pub decode_steps: usize,
    /// Median time of one decode sweep (one token for every live sequence).
    pub decode_s_per_token: f64,
    /// Mean time of one decode sweep.
    pub decode_mean_s_per_token: f64,
    /// New tokens over all sequences.
    pub generated_tokens: usize,
    /// Whole call.
    pub total_s: f64,
}

/// Everything a generate call produced.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Per sequence, in request order.
    pub sequences: Vec<SequenceOutput>,
    /// Timings.
    pub timings: Timings,
    /// Bytes of the KV cache allocated for the call.
    pub kv_cache_bytes: u64,
}

struct Live {
    seq: usize,
    prompt_len: usize,
    history: Vec<u32>,
    out: Vec<u32>,
    logits: Vec<f32>,
    sampler: Sampler,
    finished: Option<FinishReason>,
}

fn int_tensor(data: &[i64], shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(data)?
        .f_view(shape)?
        .f_to_device(device)?)
}

impl Engine {
    /// Checks a request against the model's limits before any compute.
    pub fn validate_request(&self, req: &GenerateRequest) -> Result<()> {
        let spec = self.spec();
        if req.sequences.is_empty() {
            return Err(CoreError::InvalidInput("no input sequence given".into()));
        }
        req.sampling.validate()?;
        for (i, s) in req.sequences.iter().enumerate() {
            if s.is_empty() {
                return Err(CoreError::InvalidInput(format!("sequence {i} is empty")));
            }
            if let Some(&bad) = s.iter().find(|&&t| t as usize >= spec.vocab_size) {
                return Err(CoreError::InvalidInput(format!(
                    "sequence {i}: token id {bad} is out of range (vocab_size is {})",
                    spec.vocab_size
                )));
            }
            let total = s.len().saturating_add(req.max_new_tokens);
            if spec.context_limit().is_some_and(|limit| total > limit) {
                return Err(CoreError::ContextTooLong {
                    reason: format!(
                        "sequence {i}: {} prompt tokens + {} new tokens = {total} > max_position_embeddings {}",
                        s.len(),
                        req.max_new_tokens,
                        spec.max_position_embeddings
                    ),
                });
            }
        }
        Ok(())
    }

    /// Float32 logits at every position of one prompt, row-major `[T, vocab]` (for parity checks
    /// and scoring).
    pub fn prompt_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let req = GenerateRequest {
            sequences: vec![ids.to_vec()],
            max_new_tokens: 0,
            ..Default::default()
        };
        self.validate_request(&req)?;
        let device = self.device();
        let t = ids.len() as i64;
        let mut kv = self.new_kv(1, ids.len())?;
        let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let pos: Vec<i64> = (0..t).collect();
        let input = StepInput {
            ids: int_tensor(&ids64, &[1, t], device)?,
            positions: int_tensor(&pos, &[1, t], device)?,
            max_position: t - 1,
            pads: int_tensor(&[0], &[1], device)?,
            any_pad: false,
            slot: 0,
            seq_lens: vec![ids.len()],
            prompt_lens: vec![ids.len()],
        };
        let logits = self.forward(&input, &mut kv, true)?;
        Ok(Vec::<f32>::try_from(
            logits
                .f_to_device(Device::Cpu)?
                .f_contiguous()?
                .f_view([-1])?,
        )?)
    }

    /// Runs a whole generation. `on_token` sees every new token as it is chosen and may stop a
    /// sequence or cancel everything.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> Control,
    ) -> Result<GenerateOutput> {
        self.validate_request(req)?;
        let start = Instant::now();
        let device = self.device();
        let n = req.sequences.len();
        let max_len = req.sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut live: Vec<Live> = req
            .sequences
            .iter()
            .enumerate()
            .map(|(seq, ids)| Live {
                seq,
                prompt_len: ids.len(),
                history: ids.clone(),
                out: Vec::new(),
                logits: Vec::new(),
                sampler: Sampler::new(req.sampling.seed),
                finished: None,
            })
            .collect();
        let mut done: Vec<Option<SequenceOutput>> = vec![None; n];
        let mut timings = Timings {
            prefill_tokens: req.sequences.iter().map(Vec::len).sum(),
            ..Timings::default()
        };
        if req.max_new_tokens == 0 {
            let sequences = req
                .sequences
                .iter()
                .map(|ids| SequenceOutput {
                    input_ids: ids.clone(),
                    output_ids: vec![],
                    finish_reason: FinishReason::Length,
                    logits: req.keep_logits.then(Vec::new),
                })
                .collect();
            return Ok(GenerateOutput {
                sequences,
                timings,
                kv_cache_bytes: 0,
            });
        }

        let capacity = max_len + req.max_new_tokens;
        let spec = self.spec();
        let longrope_switch = match &spec.rope.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => Some(*original_max_position_embeddings),
            _ => None,
        };
        let elem = tch_kind_size(self.kind());
        let kv_cache_bytes = KvCache::bytes(
            spec.num_layers,
            n,
            spec.num_kv_heads,
            capacity,
            spec.head_dim,
            elem,
        );
        let mut kv = self.new_kv(n, capacity).map_err(|e| CoreError::ContextTooLong {
            reason: format!(
                "cannot allocate the KV cache ({} bytes for {n} sequence(s) x {capacity} positions): {e}",
                kv_cache_bytes
            ),
        })?;

        // Prefill: left-pad every prompt to the longest.
        let (ids, positions) = left_padded(req.sequences.iter().map(Vec::as_slice), max_len);
        let pads: Vec<i64> = req
            .sequences
            .iter()
            .map(|s| (max_len - s.len()) as i64)
            .collect();
        let mut pads_t = int_tensor(&pads, &[n as i64], device)?;
        let any_pad = pads.iter().any(|&p| p > 0);
        let input = StepInput {
            ids: int_tensor(&ids, &[n as i64, max_len as i64], device)?,
            positions: int_tensor(&positions, &[n as i64, max_len as i64], device)?,
            max_position: max_len as i64 - 1,
            pads: pads_t.shallow_clone(),
            any_pad,
            slot: 0,
            seq_lens: req.sequences.iter().map(Vec::len).collect(),
            prompt_lens: req.sequences.iter().map(Vec::len).collect(),
        };
        let prefill_start = Instant::now();
        let mut logits = self.forward(&input, &mut kv, false)?;
        let mut step_times = Vec::new();
        let mut step = 0usize;
        let mut cancelled = false;
        loop {
            let vocab = logits.size()[1] as usize;
            let flat: Vec<f32> = Vec::<f32>::try_from(
                logits
                    .f_to_device(Device::Cpu)?
                    .f_contiguous()?
                    .f_view([-1])?,
            )?;
            for (row, l) in live.iter_mut().enumerate() {
                let scores = &mut flat[row * vocab..(row + 1) * vocab].to_vec();
                // One pass over the row already on the host: NaN weights would otherwise give
                // argmax 0, a plausible token.
                if let Some((token, &value)) =
                    scores.iter().enumerate().find(|(_, v)| !v.is_finite())
                {
                    return Err(CoreError::NonFiniteLogits {
                        step,
                        sequence: l.seq,
                        token,
                        value,
                    });
                }
                if req.keep_logits {
                    l.logits.extend_from_slice(scores);
                }
                let token = l
                    .sampler
                    .choose(scores, &l.history, &req.sampling)
                    .map_err(|source| CoreError::DegenerateScores {
                        step,
                        sequence: l.seq,
                        source,
                    })?;
                l.history.push(token);
                l.out.push(token);
                let control = on_token(&TokenEvent {
                    sequence: l.seq,
                    token,
                    step,
                });
                if control == Control::Cancel {
                    cancelled = true;
                }
                l.finished = if control == Control::StopSequence {
                    Some(FinishReason::Stop)
                } else if req.eos_token_ids.contains(&token) {
                    Some(FinishReason::Eos)
                } else if l.out.len() >= req.max_new_tokens {
                    Some(FinishReason::Length)
                } else {
                    None
                };
            }
            if step == 0 {
                timings.prefill_s = prefill_start.elapsed().as_secs_f64();
            }
            step += 1;
            if cancelled {
                for l in &mut live {
                    l.finished.get_or_insert(FinishReason::Cancelled);
                }
            }
            // Retire finished sequences; drop their KV rows only if others go on.
            let keep: Vec<i64> = (0..live.len())
                .filter(|&r| live[r].finished.is_none())
                .map(|r| r as i64)
                .collect();
            if keep.len() < live.len() {
                let mut remaining = Vec::with_capacity(keep.len());
                for l in live.drain(..) {
                    match l.finished {
                        Some(reason) => {
                            done[l.seq] = Some(SequenceOutput {
                                input_ids: req.sequences[l.seq].clone(),
                                output_ids: l.out,
                                finish_reason: reason,
                                logits: req.keep_logits.then_some(l.logits),
                            })
                        }
                        None => remaining.push(l),
                    }
                }
                live = remaining;
                if live.is_empty() {
                    break;
                }
                let keep_t = int_tensor(&keep, &[keep.len() as i64], device)?;
                kv.retain_rows(&keep_t)?;
                pads_t = pads_t.f_index_select(0, &keep_t)?;
            }

            // LongRoPE: a sequence reaching its pre-training length switches to the long
            // factors, and transformers (Phi-3) then recomputes the whole sequence rather than
            // keep keys rotated with the short ones. Do the same: one sweep over every live
            // sequence's whole history from slot 0 (the others recompute to what they cached).
            let a = live.len() as i64;
            let crossing = longrope_switch.is_some_and(|o| {
                live.iter()
                    .any(|l| l.prompt_len <= o && l.prompt_len + l.out.len() - 1 == o)
            });
            if crossing {
                let width = max_len + step;
                let (ids, positions) =
                    left_padded(live.iter().map(|l| l.history.as_slice()), width);
                let w = width as i64;
                let input = StepInput {
                    ids: int_tensor(&ids, &[a, w], device)?,
                    positions: int_tensor(&positions, &[a, w], device)?,
                    max_position: w - 1,
                    pads: pads_t.shallow_clone(),
                    any_pad: any_pad && live.iter().any(|l| l.prompt_len < max_len),
                    slot: 0,
                    seq_lens: live.iter().map(|l| l.history.len()).collect(),
                    prompt_lens: live.iter().map(|l| l.prompt_len).collect(),
                };
                let t = Instant::now();
                logits = self.forward(&input, &mut kv, false)?;
                step_times.push(t.elapsed().as_secs_f64());
                continue;
            }

            // Decode: the last token of every live sequence, one sweep.
            let last: Vec<i64> = live
                .iter()
                .map(|l| *l.history.last().unwrap_or(&0) as i64)
                .collect();
            let pos: Vec<i64> = live
                .iter()
                .map(|l| (l.prompt_len + l.out.len() - 1) as i64)
                .collect();
            let max_position = pos.iter().copied().max().unwrap_or(0);
            let input = StepInput {
                ids: int_tensor(&last, &[a, 1], device)?,
                positions: int_tensor(&pos, &[a, 1], device)?,
                max_position,
                pads: pads_t.shallow_clone(),
                any_pad: any_pad && live.iter().any(|l| l.prompt_len < max_len),
                slot: (max_len + step - 1) as i64,
                seq_lens: live.iter().map(|l| l.history.len()).collect(),
                prompt_lens: live.iter().map(|l| l.prompt_len).collect(),
            };
            let t = Instant::now();
            logits = self.forward(&input, &mut kv, false)?;
            step_times.push(t.elapsed().as_secs_f64());
        }
        timings.decode_steps = step_times.len();
        timings.decode_mean_s_per_token = if step_times.is_empty() {
            0.0
        } else {
            step_times.iter().sum::<f64>() / step_times.len() as f64
        };
        timings.decode_s_per_token = median(&step_times);
        timings.total_s = start.elapsed().as_secs_f64();
        timings.prefill_tokens_per_s = if timings.prefill_s > 0.0 {
            timings.prefill_tokens as f64 / timings.prefill_s
        } else {
            0.0
        };
        let sequences: Vec<SequenceOutput> = done
            .into_iter()
            .map(|s| s.expect("every sequence finishes"))
            .collect();
        timings.generated_tokens = sequences.iter().map(|s| s.output_ids.len()).sum();
        Ok(GenerateOutput {
            sequences,
            timings,
            kv_cache_bytes,
        })
    }
}

/// Token ids and positions of `rows` left-padded to `width` (pads: id 0, position 0), row-major.
fn left_padded<'a>(rows: impl Iterator<Item = &'a [u32]>, width: usize) -> (Vec<i64>, Vec<i64>) {
    let (mut ids, mut positions) = (Vec::new(), Vec::new());
    for r in rows {
        let pad = width - r.len();
        ids.extend(std::iter::repeat_n(0i64, pad));
        ids.extend(r.iter().map(|&t| t as i64));
        positions.extend(std::iter::repeat_n(0i64, pad));
        positions.extend(0..r.len() as i64);
    }
    (ids, positions)
}

fn tch_kind_size(k: Kind) -> usize {
    match k {
        Kind::Float => 4,
        Kind::Double => 8,
        _ => 2,
    }
}
