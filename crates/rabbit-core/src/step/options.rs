//! What a scheduler is asked and what it answers: its options, speculation settings, a
//! sequence request, the token events and the reports of a step.

use serde::Serialize;

use crate::error::{CoreError, Result};
use crate::sampling::SamplingParams;

/// Identifies a sequence in a scheduler (assigned in order from 0).
pub type SeqId = usize;

/// Most draft tokens per verify sweep: beyond this a sweep is no longer "about the cost of one
/// token" even when streaming, and acceptance makes long drafts pointless.
pub const MAX_DRAFT_TOKENS: usize = 32;
/// Longest n-gram prompt lookup matches.
pub const MAX_LOOKUP_NGRAM: usize = 16;

/// Where drafts come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftSource {
    /// No speculation.
    #[default]
    None,
    /// n-gram matches in the sequence itself (`max_ngram`-long suffixes down to 1).
    PromptLookup {
        /// Longest suffix matched.
        max_ngram: usize,
    },
    /// A draft model passed to [`Scheduler::step`].
    Model,
}

/// Speculative decoding settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Speculation {
    /// Draft source.
    pub source: DraftSource,
    /// Drafts per verify sweep (K); the starting K when adaptive.
    pub draft_tokens: usize,
    /// Adapt each sequence's K to its acceptance (transformers' heuristic schedule): +2 after
    /// a verify that accepted every draft, −1 (at least 1) after one that rejected some.
    pub adaptive: bool,
}

impl Speculation {
    /// Whether drafts are made.
    pub fn is_on(&self) -> bool {
        self.source != DraftSource::None
    }

    /// Refuses K = 0 or beyond [`MAX_DRAFT_TOKENS`], and absurd n-gram sizes, by name.
    pub fn validate(&self) -> Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        if self.draft_tokens == 0 || self.draft_tokens > MAX_DRAFT_TOKENS {
            return Err(CoreError::InvalidInput(format!(
                "draft tokens must be in 1..={MAX_DRAFT_TOKENS}, got {}",
                self.draft_tokens
            )));
        }
        if let DraftSource::PromptLookup { max_ngram } = self.source {
            if max_ngram == 0 || max_ngram > MAX_LOOKUP_NGRAM {
                return Err(CoreError::InvalidInput(format!(
                    "prompt lookup n-gram size must be in 1..={MAX_LOOKUP_NGRAM}, got {max_ngram}"
                )));
            }
        }
        Ok(())
    }
}

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Live sequences at most (KV rows); more wait in a queue.
    pub max_batch: usize,
    /// KV slots per sequence: prompt + new tokens of any sequence must fit.
    pub capacity: usize,
    /// Longest prefill chunk per sweep (`None`: a prompt in one sweep).
    pub prefill_chunk: Option<usize>,
    /// Speculative decoding.
    pub speculation: Speculation,
}

/// One sequence to generate.
#[derive(Debug, Clone, Default)]
pub struct SequenceRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Upper bound of new tokens.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: SamplingParams,
    /// Stop ids.
    pub eos_token_ids: Vec<u32>,
    /// Keep the raw float32 logits of every emitted token.
    pub keep_logits: bool,
    /// Report each emitted token's log-probability and this many most likely alternatives
    /// (0..=[`MAX_TOP_LOGPROBS`]) in its [`TokenEvent`].
    pub logprobs: Option<usize>,
}

/// Most alternatives a token's [`TokenLogprobs`] lists (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Log-probabilities of one emitted token under the model's distribution at its position (the
/// raw logits' log-softmax, before temperature, penalties or truncation: what the model says,
/// whatever sampling then did with it).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The emitted token's.
    pub logprob: f32,
    /// The most likely tokens and theirs, most likely first (ties by lower id).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// From one position's logits: `token`'s log-probability and the `top` best.
    pub fn from_logits(row: &[f32], token: u32, top: usize) -> TokenLogprobs {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let norm = max + sum.ln();
        let lp = |v: f32| (v as f64 - norm) as f32;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (i, &v) in row.iter().enumerate() {
                if best.len() == top && v <= best[top - 1].1 {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= v);
                best.insert(at, (i as u32, v));
                best.truncate(top);
            }
        }
        TokenLogprobs {
            logprob: lp(row[token as usize]),
            top: best.into_iter().map(|(i, v)| (i, lp(v))).collect(),
        }
    }
}

/// A sequence that left the scheduler.
#[derive(Debug)]
pub struct Finished {
    /// Its id.
    pub id: SeqId,
    /// What it produced (up to the failure, when it failed).
    pub output: SequenceOutput,
    /// Why it failed, with [`FinishReason::Failed`]: its logits were not finite or its sampling
    /// settings left nothing to sample from. The other sequences of the sweep are unaffected.
    pub error: Option<CoreError>,
}

/// Counters since the scheduler was made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    /// Target sweeps run.
    pub sweeps: usize,
    /// Drafts proposed.
    pub draft_tokens: usize,
    /// Drafts accepted.
    pub accepted_tokens: usize,
    /// Time making drafts (draft model sweeps, lookups).
    pub draft_s: f64,
    /// Time in target sweeps (forward and token choice).
    pub sweep_s: f64,
}

/// What one [`Scheduler::step`] did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Sequences that left.
    pub finished: Vec<Finished>,
    /// Rows in the sweep (0: nothing was live).
    pub rows: usize,
    /// Rows that emitted tokens.
    pub emitting_rows: usize,
    /// Tokens emitted over all rows.
    pub emitted: usize,
    /// Some row fed a prompt chunk.
    pub prefill: bool,
    /// Draft time of this step.
    pub draft_s: f64,
    /// Target sweep time of this step.
    pub sweep_s: f64,
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
    /// Its logits or sampling failed ([`Finished::error`]).
    Failed,
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
pub struct TokenEvent<'a> {
    /// Index of the sequence in the request.
    pub sequence: usize,
    /// The token.
    pub token: u32,
    /// 0 for the first new token.
    pub step: usize,
    /// Its log-probabilities, when the sequence asked for them
    /// ([`SequenceRequest::logprobs`]).
    pub logprobs: Option<&'a TokenLogprobs>,
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

#[cfg(test)]
mod tests {
    use super::TokenLogprobs;

    #[test]
    fn logprobs_are_the_log_softmax_and_its_best() {
        let row = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lp = TokenLogprobs::from_logits(&row, 2, 3);
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        let want = |v: f32| (v as f64 - z.ln()) as f32;
        assert!((lp.logprob - want(-2.0)).abs() < 1e-6);
        // Most likely first; the tie between ids 1 and 3 goes to the lower id.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        for (id, v) in &lp.top {
            assert!((v - want(row[*id as usize])).abs() < 1e-6);
        }
        assert!(TokenLogprobs::from_logits(&row, 0, 0).top.is_empty());
        assert_eq!(TokenLogprobs::from_logits(&row, 0, 9).top.len(), 5);
    }
}
