//! Where drafts come from: prompt lookup (n-gram matches in the sequence itself, no model) or a
//! small draft model kept resident, run for all drafting sequences in the same sweeps.

use tch::Device;

use crate::engine::{Engine, Logits, RowInput, StepInput};
use crate::error::{CoreError, Result};
use crate::kv::KvCache;
use crate::sampling::{distribution, greedy, Sampler, SamplingParams};

/// transformers' prompt lookup (`prompt_lookup_num_tokens`): the last `n` tokens (n from
/// `max_ngram` down to 1) are searched for earlier in `tokens`; the first match's continuation
/// (up to `k` tokens) is the draft. No match: no draft (the step decodes one token as usual).
pub fn prompt_lookup(tokens: &[u32], max_ngram: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let tail = &tokens[len - n..];
        // Windows that end before the tail itself; the first whose continuation is non-empty.
        for start in 0..len - n {
            if &tokens[start..start + n] == tail {
                let from = start + n;
                let to = (from + k).min(len);
                if from < to {
                    return tokens[from..to].to_vec();
                }
            }
        }
    }
    Vec::new()
}

/// One sequence's part of a draft-model round.
pub struct DraftJob<'a> {
    /// The sequence so far (prompt and generated tokens).
    pub tokens: &'a [u32],
    /// Its prompt length.
    pub prompt_len: usize,
    /// Tokens of it in the draft's cache (updated).
    pub cached: &'a mut usize,
    /// Drafts wanted (0: this row only keeps its place).
    pub k: usize,
    /// Token choice (the target's settings: greedy drafts for greedy decoding).
    pub params: &'a SamplingParams,
    /// The sequence's random stream.
    pub sampler: &'a mut Sampler,
    /// The drafts (out).
    pub drafts: Vec<u32>,
    /// Their distributions when sampled (out; empty for greedy).
    pub q: Vec<Vec<f64>>,
}

/// Runs the draft model for `jobs` (job `i` is row `i` of `kv`): a first sweep catches each
/// row's draft cache up with its sequence and proposes the first token, then one sweep per
/// further draft token. The draft cache ends holding each sequence plus its first `k - 1`
/// drafts.
pub fn run_draft_model(
    draft: &mut Engine,
    kv: &mut KvCache,
    jobs: &mut [DraftJob<'_>],
) -> Result<()> {
    let device: Device = draft.device();
    let rounds = jobs.iter().map(|j| j.k).max().unwrap_or(0);
    for s in 0..rounds {
        let feeds: Vec<Vec<u32>> = jobs
            .iter()
            .map(|j| {
                if j.k <= s {
                    Vec::new()
                } else if s == 0 {
                    j.tokens[*j.cached..].to_vec()
                } else {
                    vec![j.drafts[s - 1]]
                }
            })
            .collect();
        let rows: Vec<RowInput<'_>> = jobs
            .iter()
            .zip(&feeds)
            .map(|(j, f)| RowInput {
                tokens: f,
                past: *j.cached,
                prompt_len: j.prompt_len,
                logits: if f.is_empty() {
                    Logits::None
                } else {
                    Logits::Last
                },
            })
            .collect();
        let input = StepInput::new(&rows, device)?;
        let logits = draft.forward(&input, kv)?;
        let vocab = logits.size()[1] as usize;
        let flat = Vec::<f32>::try_from(
            logits
                .f_to_device(Device::Cpu)?
                .f_contiguous()?
                .f_view([-1])?,
        )?;
        let mut at = 0;
        for (j, f) in jobs.iter_mut().zip(&feeds) {
            if f.is_empty() {
                continue;
            }
            *j.cached += f.len();
            let mut scores = flat[at * vocab..(at + 1) * vocab].to_vec();
            at += 1;
            let mut hist = j.tokens.to_vec();
            hist.extend_from_slice(&j.drafts);
            let token = if j.params.is_sampling() {
                let q = distribution(&mut scores, &hist, j.params)
                    .map_err(|e| CoreError::InvalidInput(format!("draft model: {e}")))?;
                let t = j.sampler.sample(&q);
                j.q.push(q);
                t
            } else {
                greedy(&mut scores, &hist, j.params)
                    .map_err(|e| CoreError::InvalidInput(format!("draft model: {e}")))?
            };
            j.drafts.push(token);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_copies_the_continuation_of_the_longest_match() {
        // "a b c d ... a b" → the continuation of the earlier "a b".
        let t = [1, 2, 3, 4, 9, 1, 2];
        assert_eq!(prompt_lookup(&t, 3, 2), vec![3, 4]);
        assert_eq!(prompt_lookup(&t, 3, 10), vec![3, 4, 9, 1, 2]);
        // A longer n-gram wins over a shorter, earlier one.
        let t = [5, 2, 7, 1, 2, 8, 1, 2];
        assert_eq!(prompt_lookup(&t, 2, 1), vec![8]);
        assert_eq!(prompt_lookup(&t, 1, 1), vec![7]);
        // Nothing to match: no draft.
        assert!(prompt_lookup(&[1, 2, 3], 3, 4).is_empty());
        assert!(prompt_lookup(&[1], 3, 4).is_empty());
        assert!(prompt_lookup(&[1, 1], 3, 0).is_empty());
        assert_eq!(prompt_lookup(&[1, 1], 3, 4), vec![1]);
    }
}
