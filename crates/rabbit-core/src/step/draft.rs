//! Where drafts come from: prompt lookup (n-gram matches in the sequence itself, no model) or a
//! small draft model kept resident, run for all drafting sequences in the same sweeps; and the
//! scheduler's drafting step, which picks each sequence's K and asks the source.

use tch::Device;

use super::{DraftSource, Scheduler};
use crate::engine::{host_f32, Engine, Logits, RowInput, StepInput};
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
        let flat = host_f32(&logits)?;
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

impl Scheduler {
    /// Drafts for every sequence that decodes this sweep.
    pub(super) fn make_drafts(
        &mut self,
        target: &Engine,
        draft: Option<&mut Engine>,
    ) -> Result<()> {
        let spec = self.opts.speculation.clone();
        for s in &mut self.live {
            s.drafts.clear();
            s.q.clear();
            // Drafting advanced the draft's rows before the verify that pulls them back; after
            // a failed sweep that never came, only the sequence's own tokens are known valid.
            s.draft_cached = s.draft_cached.min(s.tokens.len() - 1);
        }
        if !spec.is_on() {
            return Ok(());
        }
        let ks: Vec<usize> = self
            .live
            .iter()
            .map(|s| {
                if s.pending() != 1 {
                    return 0;
                }
                // Drafts past the last new token would be wasted.
                let remaining = s.req.max_new_tokens - s.out.len();
                let wanted = if spec.adaptive {
                    s.k
                } else {
                    spec.draft_tokens
                };
                let mut k = wanted.min(remaining.saturating_sub(1));
                // A verify block must see the RoPE frequencies one-token steps would.
                let n0 = s.tokens.len();
                while k > 0 && !target.rope_uniform(n0, n0 + k, s.req.prompt.len()) {
                    k -= 1;
                }
                k
            })
            .collect();
        if ks.iter().all(|&k| k == 0) {
            return Ok(());
        }
        match spec.source {
            DraftSource::None => {}
            DraftSource::PromptLookup { max_ngram } => {
                for (s, &k) in self.live.iter_mut().zip(&ks) {
                    s.drafts = prompt_lookup(&s.tokens, max_ngram, k);
                }
            }
            DraftSource::Model => {
                let (Some(draft), Some(kv)) = (draft, self.draft_kv.as_mut()) else {
                    return Err(CoreError::InvalidInput(
                        "speculation from a draft model needs the draft model".into(),
                    ));
                };
                let mut jobs: Vec<DraftJob<'_>> = self
                    .live
                    .iter_mut()
                    .zip(&ks)
                    .map(|(s, &k)| DraftJob {
                        tokens: &s.tokens,
                        prompt_len: s.req.prompt.len(),
                        cached: &mut s.draft_cached,
                        k,
                        params: &s.req.sampling,
                        sampler: &mut s.sampler,
                        drafts: Vec::new(),
                        q: Vec::new(),
                    })
                    .collect();
                run_draft_model(draft, kv, &mut jobs)?;
                let made: Vec<(Vec<u32>, Vec<Vec<f64>>)> =
                    jobs.into_iter().map(|j| (j.drafts, j.q)).collect();
                for (s, (d, q)) in self.live.iter_mut().zip(made) {
                    s.drafts = d;
                    s.q = q;
                }
            }
        }
        Ok(())
    }
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
