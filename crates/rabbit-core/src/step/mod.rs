//! The step-level engine: a [`Scheduler`] owns the live sequences and their KV rows, and each
//! [`Scheduler::step`] runs one sweep over the weights that carries, for every live sequence,
//! whatever it needs next: a prefill chunk, one decode token, or a token and its drafts to
//! verify. Sequences join (at the next sweep) and leave (at once) between sweeps.
//!
//! A sequence's KV row only ever holds its own tokens from slot 0, so it computes exactly as it
//! would alone; rejected drafts are rolled back by setting its length back (nothing is copied),
//! and a finished sequence's row is refilled by moving the last live row into it (one row's
//! copy, not a reallocation).
//!
//! ```no_run
//! use rabbit_core::{Control, Engine, Scheduler, SchedulerOptions, SequenceRequest, Speculation};
//! # fn serve(engine: &mut Engine) -> rabbit_core::Result<()> {
//! let opts = SchedulerOptions {
//!     max_batch: 16,           // live sequences; more wait in the queue
//!     capacity: 4096,          // prompt + new tokens per sequence
//!     prefill_chunk: Some(256),
//!     speculation: Speculation::default(),
//! };
//! let mut sched = Scheduler::new(engine, None, opts)?;
//! let id = sched.add(engine, SequenceRequest {
//!     prompt: vec![1, 2, 3],
//!     max_new_tokens: 32,
//!     ..Default::default()
//! })?;
//! while !sched.is_idle() {
//!     // New requests may be added (or cancelled) between steps.
//!     let report = sched.step(engine, None, &mut |ev| {
//!         println!("sequence {} token {}", ev.sequence, ev.token);
//!         Control::Continue
//!     })?;
//!     for f in report.finished {
//!         assert_eq!(f.id, id);
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod draft;
mod options;
pub mod verify;

pub use options::{
    Control, DraftSource, FinishReason, Finished, SchedulerOptions, SeqId, SequenceOutput,
    SequenceRequest, Speculation, StepReport, StepStats, TokenEvent, TokenLogprobs,
    MAX_DRAFT_TOKENS, MAX_LOOKUP_NGRAM, MAX_TOP_LOGPROBS,
};

use std::collections::VecDeque;
use std::time::Instant;

use crate::engine::{host_f32, Engine, Logits, RowInput, StepInput};
use crate::error::{CoreError, Result};
use crate::kv::KvCache;
use crate::sampling::Sampler;

struct Seq {
    id: SeqId,
    req: SequenceRequest,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Tokens in the target's KV row.
    cached: usize,
    /// Tokens in the draft's KV row.
    draft_cached: usize,
    /// Drafts this sequence asks for next (adaptive speculation moves it).
    k: usize,
    sampler: Sampler,
    out: Vec<u32>,
    logits: Vec<f32>,
    finished: Option<FinishReason>,
    drafts: Vec<u32>,
    q: Vec<Vec<f64>>,
    /// Why it failed ([`FinishReason::Failed`]).
    error: Option<CoreError>,
}

impl Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.cached
    }

    fn output(self) -> Finished {
        Finished {
            id: self.id,
            error: self.error,
            output: SequenceOutput {
                input_ids: self.req.prompt,
                output_ids: self.out,
                finish_reason: self.finished.unwrap_or(FinishReason::Cancelled),
                logits: self.req.keep_logits.then_some(self.logits),
            },
        }
    }
}

/// The live sequences, their KV rows and the waiting queue.
pub struct Scheduler {
    opts: SchedulerOptions,
    kv: KvCache,
    draft_kv: Option<KvCache>,
    live: Vec<Seq>,
    waiting: VecDeque<Seq>,
    done: Vec<Finished>,
    next_id: SeqId,
    /// Counters.
    pub stats: StepStats,
}

impl Scheduler {
    /// Allocates the KV rows for `target` (and `draft`, which [`DraftSource::Model`] needs and
    /// must share the target's vocabulary).
    pub fn new(target: &Engine, draft: Option<&Engine>, opts: SchedulerOptions) -> Result<Self> {
        if opts.max_batch == 0 {
            return Err(CoreError::InvalidInput("max batch must be >= 1".into()));
        }
        if opts.prefill_chunk == Some(0) {
            return Err(CoreError::InvalidInput("prefill chunk must be >= 1".into()));
        }
        opts.speculation.validate()?;
        // Far beyond any memory; refused by size rather than wrapped into a negative shape.
        if opts.capacity > (i64::MAX / 2) as usize {
            return Err(CoreError::ContextTooLong {
                reason: format!(
                    "{} positions per sequence cannot be allocated",
                    opts.capacity
                ),
            });
        }
        let wants_draft = opts.speculation.source == DraftSource::Model;
        match (wants_draft, draft) {
            (true, None) => {
                return Err(CoreError::InvalidInput(
                    "speculation from a draft model needs the draft model".into(),
                ))
            }
            (false, Some(_)) => {
                return Err(CoreError::InvalidInput(
                    "a draft model was given but speculation does not use it".into(),
                ))
            }
            _ => {}
        }
        if let Some(d) = draft {
            check_draft_vocab(target, d)?;
        }
        let alloc = |e: &Engine, what: &str| {
            e.new_kv(opts.max_batch, opts.capacity.max(1))
                .map_err(|err| CoreError::ContextTooLong {
                    reason: format!(
                        "cannot allocate the {what} KV cache ({} sequence(s) x {} positions): {err}",
                        opts.max_batch, opts.capacity
                    ),
                })
        };
        let kv = alloc(target, "model's")?;
        let draft_kv = draft.map(|d| alloc(d, "draft model's")).transpose()?;
        Ok(Scheduler {
            opts,
            kv,
            draft_kv,
            live: Vec::new(),
            waiting: VecDeque::new(),
            done: Vec::new(),
            next_id: 0,
            stats: StepStats::default(),
        })
    }

    /// Bytes of the KV caches (target and draft).
    pub fn kv_bytes(&self, target: &Engine, draft: Option<&Engine>) -> u64 {
        let one = |e: &Engine| {
            let s = e.spec();
            KvCache::bytes(
                s.num_layers,
                self.opts.max_batch,
                &s.kv_shape(),
                self.opts.capacity,
                e.kind().elt_size_in_bytes(),
            )
        };
        one(target) + draft.map_or(0, one)
    }

    /// Queues a sequence; it joins the next sweep that has a free row.
    pub fn add(&mut self, target: &Engine, req: SequenceRequest) -> Result<SeqId> {
        let id = self.next_id;
        target.validate_sequence(id, &req.prompt, req.max_new_tokens, &req.sampling)?;
        if req.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(CoreError::InvalidInput(format!(
                "sequence {id}: at most {MAX_TOP_LOGPROBS} top log-probabilities per token, \
                 asked for {}",
                req.logprobs.unwrap_or(0)
            )));
        }
        let total = req.prompt.len().saturating_add(req.max_new_tokens);
        if total > self.opts.capacity {
            return Err(CoreError::ContextTooLong {
                reason: format!(
                    "sequence {id}: {} prompt tokens + {} new tokens = {total} > the {} \
                     positions per sequence this scheduler was made for",
                    req.prompt.len(),
                    req.max_new_tokens,
                    self.opts.capacity
                ),
            });
        }
        self.next_id += 1;
        let seq = Seq {
            id,
            tokens: req.prompt.clone(),
            cached: 0,
            draft_cached: 0,
            k: self.opts.speculation.draft_tokens,
            sampler: Sampler::new(req.sampling.seed),
            out: Vec::new(),
            logits: Vec::new(),
            finished: (req.max_new_tokens == 0).then_some(FinishReason::Length),
            drafts: Vec::new(),
            q: Vec::new(),
            error: None,
            req,
        };
        if seq.finished.is_some() {
            self.done.push(seq.output());
        } else {
            self.waiting.push_back(seq);
        }
        Ok(id)
    }

    /// Cancels a sequence (live or waiting); it is reported finished by the next step.
    pub fn cancel(&mut self, id: SeqId) {
        for s in self.live.iter_mut().chain(self.waiting.iter_mut()) {
            if s.id == id {
                s.finished.get_or_insert(FinishReason::Cancelled);
            }
        }
    }

    /// Nothing live, waiting or unreported.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.waiting.is_empty() && self.done.is_empty()
    }

    /// Sequences in the sweep.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Sequences waiting for a row.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// KV positions holding tokens of live sequences.
    pub fn cached_positions(&self) -> usize {
        self.live.iter().map(|s| s.cached).sum()
    }

    /// One sweep: admits waiting sequences into free rows, makes drafts, runs the target over
    /// every live sequence's next positions, emits the chosen tokens through `on_token`, and
    /// retires the sequences that finished.
    pub fn step(
        &mut self,
        target: &mut Engine,
        draft: Option<&mut Engine>,
        on_token: &mut dyn FnMut(&TokenEvent) -> Control,
    ) -> Result<StepReport> {
        let mut report = StepReport::default();
        let mut cancelled_waiting = Vec::new();
        self.waiting.retain_mut(|s| {
            let keep = s.finished.is_none();
            if !keep {
                cancelled_waiting.push(std::mem::replace(s, placeholder()));
            }
            keep
        });
        report.finished.append(&mut self.done);
        report
            .finished
            .extend(cancelled_waiting.into_iter().map(Seq::output));
        self.retire(&mut report.finished)?;
        while self.live.len() < self.opts.max_batch {
            match self.waiting.pop_front() {
                Some(s) => self.live.push(s),
                None => break,
            }
        }
        if self.live.is_empty() {
            return Ok(report);
        }
        report.rows = self.live.len();

        let draft_start = Instant::now();
        self.make_drafts(target, draft)?;
        report.draft_s = draft_start.elapsed().as_secs_f64();

        let sweep_start = Instant::now();
        let chunk = self.opts.prefill_chunk;
        let mut feeds: Vec<(usize, Logits)> = Vec::with_capacity(self.live.len());
        for s in &self.live {
            let pending = s.pending();
            if pending > 1 {
                report.prefill = true;
                let end = s.tokens.len();
                let c = match chunk {
                    Some(c)
                        if c < pending
                            && target.rope_uniform(s.cached + c, end, s.req.prompt.len()) =>
                    {
                        c
                    }
                    _ => pending,
                };
                let wants = if s.cached + c == end {
                    Logits::Last
                } else {
                    Logits::None
                };
                feeds.push((c, wants));
            } else if s.drafts.is_empty() {
                feeds.push((1, Logits::Last));
            } else {
                feeds.push((1 + s.drafts.len(), Logits::All));
            }
        }
        let fed_tokens: Vec<Vec<u32>> = self
            .live
            .iter()
            .zip(&feeds)
            .map(|(s, &(n, _))| {
                let mut t = s.tokens[s.cached..s.cached + n.min(s.pending())].to_vec();
                t.extend_from_slice(&s.drafts);
                t
            })
            .collect();
        let rows: Vec<RowInput<'_>> = self
            .live
            .iter()
            .zip(&feeds)
            .zip(&fed_tokens)
            .map(|((s, &(_, logits)), t)| RowInput {
                tokens: t,
                past: s.cached,
                prompt_len: s.req.prompt.len(),
                logits,
            })
            .collect();
        let input = StepInput::new(&rows, target.device())?;
        let logits = target.forward(&input, &mut self.kv)?;
        self.stats.sweeps += 1;
        let vocab = logits.size()[1] as usize;
        let flat = host_f32(&logits)?;

        let mut at = 0usize;
        let mut cancel_all = false;
        let longrope = target.longrope_switch();
        for (s, &(n, wants)) in self.live.iter_mut().zip(&feeds) {
            if cancel_all {
                // "Stop every sequence now": the rows after the cancelling one emit nothing.
                break;
            }
            let count = match wants {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => n,
            };
            let rows: Vec<&[f32]> = (at..at + count)
                .map(|r| &flat[r * vocab..(r + 1) * vocab])
                .collect();
            at += count;
            if count == 0 {
                s.cached += n;
                continue;
            }
            // Only the rows a token is chosen from are checked, as plain decoding checks each
            // row it sees: a row after a rejected draft is never one it would have computed.
            let (id, out_len) = (s.id, s.out.len());
            let non_finite = |upto: usize| -> Result<()> {
                for (j, row) in rows.iter().enumerate().take(upto + 1) {
                    if let Some((token, &value)) =
                        row.iter().enumerate().find(|(_, v)| !v.is_finite())
                    {
                        return Err(CoreError::NonFiniteLogits {
                            step: out_len + j,
                            sequence: id,
                            token,
                            value,
                        });
                    }
                }
                Ok(())
            };
            let n0 = s.tokens.len();
            let stats = &mut self.stats;
            // A failure of this row's logits or sampling ends this sequence alone (its error in
            // its Finished); the others in the sweep go on.
            let chosen = (|| -> Result<(usize, u32)> {
                non_finite(0)?;
                Ok(if s.drafts.is_empty() {
                    s.cached += n;
                    let mut scores = rows[0].to_vec();
                    let t = s
                        .sampler
                        .choose(&mut scores, &s.tokens, &s.req.sampling)
                        .map_err(|source| CoreError::DegenerateScores {
                            step: s.out.len(),
                            sequence: s.id,
                            source,
                        })?;
                    (0, t)
                } else {
                    let q = (!s.q.is_empty()).then_some(s.q.as_slice());
                    let v = verify::verify(
                        &rows,
                        &s.drafts,
                        q,
                        &s.tokens,
                        &s.req.sampling,
                        &mut s.sampler,
                    )
                    .map_err(|(j, source)| {
                        non_finite(j).err().unwrap_or(CoreError::DegenerateScores {
                            step: out_len + j,
                            sequence: id,
                            source,
                        })
                    })?;
                    non_finite(v.accepted)?;
                    stats.draft_tokens += s.drafts.len();
                    stats.accepted_tokens += v.accepted;
                    s.k = if v.accepted == s.drafts.len() {
                        (s.k + 2).min(MAX_DRAFT_TOKENS)
                    } else {
                        s.k.saturating_sub(1).max(1)
                    };
                    // Rejected drafts' slots are simply beyond the row's length now.
                    s.cached = n0 + v.accepted;
                    s.draft_cached = s.draft_cached.min(n0 + v.accepted);
                    (v.accepted, v.next)
                })
            })();
            let (accepted, next) = match chosen {
                Ok(c) => c,
                Err(e) => {
                    s.finished = Some(FinishReason::Failed);
                    s.error = Some(e);
                    continue;
                }
            };
            report.emitting_rows += 1;
            let emitted: Vec<u32> = s.drafts[..accepted]
                .iter()
                .copied()
                .chain(std::iter::once(next))
                .collect();
            for (j, token) in emitted.into_iter().enumerate() {
                s.tokens.push(token);
                s.out.push(token);
                if s.req.keep_logits {
                    s.logits.extend_from_slice(rows[j]);
                }
                report.emitted += 1;
                let logprobs = s
                    .req
                    .logprobs
                    .map(|top| TokenLogprobs::from_logits(rows[j], token, top));
                let control = on_token(&TokenEvent {
                    sequence: s.id,
                    token,
                    step: s.out.len() - 1,
                    logprobs: logprobs.as_ref(),
                });
                if control == Control::Cancel {
                    cancel_all = true;
                }
                s.finished = if control == Control::StopSequence {
                    Some(FinishReason::Stop)
                } else if s.req.eos_token_ids.contains(&token) {
                    Some(FinishReason::Eos)
                } else if s.out.len() >= s.req.max_new_tokens {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                if s.finished.is_some() || cancel_all {
                    break;
                }
            }
            // LongRoPE: a sequence passing its pre-training length switches to the long
            // factors, and transformers (Phi-3) then recomputes the whole sequence rather than
            // keep keys rotated with the short ones: so does this row, alone.
            if let Some(o) = longrope {
                if s.cached > 0 && s.cached <= o && s.tokens.len() > o {
                    s.cached = 0;
                }
            }
        }
        if cancel_all {
            for s in self.live.iter_mut().chain(self.waiting.iter_mut()) {
                s.finished.get_or_insert(FinishReason::Cancelled);
            }
        }
        report.sweep_s = sweep_start.elapsed().as_secs_f64();
        self.stats.sweep_s += report.sweep_s;
        self.stats.draft_s += report.draft_s;
        self.retire(&mut report.finished)?;
        if cancel_all {
            let waiting: Vec<Seq> = self.waiting.drain(..).collect();
            report.finished.extend(waiting.into_iter().map(Seq::output));
        }
        Ok(report)
    }

    /// Moves finished sequences out; the last live row fills each freed row.
    fn retire(&mut self, out: &mut Vec<Finished>) -> Result<()> {
        for r in (0..self.live.len()).rev() {
            if self.live[r].finished.is_none() {
                continue;
            }
            let last = self.live.len() - 1;
            if r != last {
                let (from, to) = (last as i64, r as i64);
                self.kv.move_row(from, to, self.live[last].cached as i64)?;
                if let Some(d) = self.draft_kv.as_mut() {
                    d.move_row(from, to, self.live[last].draft_cached as i64)?;
                }
            }
            out.push(self.live.swap_remove(r).output());
        }
        Ok(())
    }
}

/// An empty sequence to swap out of the queue.
fn placeholder() -> Seq {
    Seq {
        id: usize::MAX,
        req: SequenceRequest::default(),
        tokens: Vec::new(),
        cached: 0,
        draft_cached: 0,
        k: 0,
        sampler: Sampler::new(0),
        out: Vec::new(),
        logits: Vec::new(),
        finished: None,
        drafts: Vec::new(),
        q: Vec::new(),
        error: None,
    }
}

/// A draft must score the target's tokens: the same vocabulary size (the front end also
/// compares the tokenizers).
fn check_draft_vocab(target: &Engine, draft: &Engine) -> Result<()> {
    let (t, d) = (target.spec().vocab_size, draft.spec().vocab_size);
    if t != d {
        return Err(CoreError::InvalidInput(format!(
            "the draft model's vocabulary has {d} tokens, the model's {t}: a draft must share \
             the model's tokenizer"
        )));
    }
    Ok(())
}
