//! Batched generation: every sequence of a request joins one [`Scheduler`] at once, and steps run
//! until all have finished (prefill, optionally chunked, then decode sweeps, optionally
//! speculative). Finished sequences leave at once, so they stop costing compute.

use std::time::Instant;

use serde::Serialize;

use crate::engine::{host_f32, Engine, Logits, RowInput, StepInput};
use crate::error::{CoreError, Result};
use crate::sampling::SamplingParams;
use crate::stats::median;
pub use crate::step::{Control, FinishReason, SequenceOutput, TokenEvent};
use crate::step::{Scheduler, SchedulerOptions, SequenceRequest, Speculation};

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
    /// Longest prompt chunk per sweep (`None`: each prompt in one sweep).
    pub prefill_chunk: Option<usize>,
    /// Speculative decoding (a draft model is passed to [`Engine::generate_with_draft`]).
    pub speculation: Speculation,
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
    /// Decode sweeps run (after every sequence had its first token).
    pub decode_steps: usize,
    /// Median over decode sweeps of the sweep's time (drafting included) per token it gave each
    /// live sequence: with speculation a sweep gives several.
    pub decode_s_per_token: f64,
    /// Decode time over decode tokens per sequence.
    pub decode_mean_s_per_token: f64,
    /// Target sweeps run, prefill included.
    pub sweeps: usize,
    /// Drafts proposed (speculative decoding).
    pub draft_tokens: usize,
    /// Drafts accepted.
    pub accepted_tokens: usize,
    /// Tokens per sequence per decode sweep (1 without speculation).
    pub tokens_per_sweep: f64,
    /// Time making drafts.
    pub draft_s: f64,
    /// Time in target sweeps.
    pub sweep_s: f64,
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

impl Engine {
    /// Checks a request against the model's limits before any compute.
    pub fn validate_request(&self, req: &GenerateRequest) -> Result<()> {
        if req.sequences.is_empty() {
            return Err(CoreError::InvalidInput("no input sequence given".into()));
        }
        req.sampling.validate()?;
        req.speculation.validate()?;
        if req.prefill_chunk == Some(0) {
            return Err(CoreError::InvalidInput("prefill chunk must be >= 1".into()));
        }
        for (i, s) in req.sequences.iter().enumerate() {
            self.validate_sequence(i, s, req.max_new_tokens, &req.sampling)?;
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
        let mut kv = self.new_kv(1, ids.len())?;
        let input = StepInput::new(
            &[RowInput {
                tokens: ids,
                past: 0,
                prompt_len: ids.len(),
                logits: Logits::All,
            }],
            self.device(),
        )?;
        let logits = self.forward(&input, &mut kv)?;
        host_f32(&logits)
    }

    /// Runs a whole generation. `on_token` sees every new token as it is chosen and may stop a
    /// sequence or cancel everything.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> Control,
    ) -> Result<GenerateOutput> {
        self.generate_with_draft(req, None, on_token)
    }

    /// [`Engine::generate`] with a draft model for [`crate::step::DraftSource::Model`].
    pub fn generate_with_draft(
        &mut self,
        req: &GenerateRequest,
        mut draft: Option<&mut Engine>,
        on_token: &mut dyn FnMut(&TokenEvent) -> Control,
    ) -> Result<GenerateOutput> {
        self.validate_request(req)?;
        let start = Instant::now();
        let n = req.sequences.len();
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
        let max_len = req.sequences.iter().map(Vec::len).max().unwrap_or(0);
        let opts = SchedulerOptions {
            max_batch: n,
            // validate_request bounded it by the context where the model has one; saturating
            // leaves an absurd request to fail as an allocation, by size.
            capacity: max_len.saturating_add(req.max_new_tokens),
            prefill_chunk: req.prefill_chunk,
            speculation: req.speculation.clone(),
        };
        let mut sched = Scheduler::new(self, draft.as_deref(), opts)?;
        let kv_cache_bytes = sched.kv_bytes(self, draft.as_deref());
        for s in &req.sequences {
            sched.add(
                self,
                SequenceRequest {
                    prompt: s.clone(),
                    max_new_tokens: req.max_new_tokens,
                    sampling: req.sampling.clone(),
                    eos_token_ids: req.eos_token_ids.clone(),
                    keep_logits: req.keep_logits,
                    logprobs: None,
                },
            )?;
        }
        let mut done: Vec<Option<SequenceOutput>> = vec![None; n];
        let mut started = vec![false; n];
        let mut prefilled = false;
        let (mut step_times, mut decode_time, mut advance_sum) = (Vec::new(), 0.0, 0.0);
        while !sched.is_idle() {
            let report = sched.step(self, draft.as_deref_mut(), &mut |ev| {
                started[ev.sequence] = true;
                on_token(ev)
            })?;
            for f in report.finished {
                // A call generates all its sequences or fails: the first failure is its error.
                if let Some(e) = f.error {
                    return Err(e);
                }
                done[f.id] = Some(f.output);
            }
            if !prefilled {
                // Prefill ends with the sweep that gave every sequence its first token.
                if started.iter().all(|&s| s) {
                    prefilled = true;
                    timings.prefill_s = start.elapsed().as_secs_f64();
                }
                continue;
            }
            if report.emitting_rows > 0 {
                let t = report.sweep_s + report.draft_s;
                let advance = report.emitted as f64 / report.emitting_rows as f64;
                step_times.push(t / advance);
                decode_time += t;
                advance_sum += advance;
            }
        }
        timings.decode_steps = step_times.len();
        timings.decode_mean_s_per_token = if advance_sum > 0.0 {
            decode_time / advance_sum
        } else {
            0.0
        };
        timings.tokens_per_sweep = if step_times.is_empty() {
            0.0
        } else {
            advance_sum / step_times.len() as f64
        };
        timings.decode_s_per_token = median(&step_times);
        timings.sweeps = sched.stats.sweeps;
        timings.draft_tokens = sched.stats.draft_tokens;
        timings.accepted_tokens = sched.stats.accepted_tokens;
        timings.draft_s = sched.stats.draft_s;
        timings.sweep_s = sched.stats.sweep_s;
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
