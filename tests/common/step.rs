//! Helpers of the step-engine tests (tests/step.rs, tests/speculation.rs): a sequence generated
//! alone, and the same sequences run under a schedule (joins, a queue, chunks, drafts).

use rabbitllm::core::step::{
    DraftSource, Scheduler, SchedulerOptions, SequenceRequest, Speculation, TokenLogprobs,
};
use rabbitllm::core::Engine;
use rabbitllm::{Control, DType, GenerateRequest, SamplingParams};

use super::Case;

/// `case` with every layer streamed, and its split directory (kept while the model lives).
pub fn open(case: &Case, dtype: DType) -> (rabbitllm::Model, tempfile::TempDir) {
    let split = tempfile::tempdir().unwrap();
    (case.open(dtype, split.path()), split)
}

/// A sequence's tokens and float32 logits.
pub type Generated = (Vec<u32>, Vec<f32>);

/// Tokens and logits of one sequence generated alone (plain decoding, no chunks).
pub fn alone(
    engine: &mut Engine,
    prompt: &[u32],
    n: usize,
    sampling: &SamplingParams,
) -> (Vec<u32>, Vec<f32>) {
    let req = GenerateRequest {
        sequences: vec![prompt.to_vec()],
        max_new_tokens: n,
        sampling: sampling.clone(),
        keep_logits: true,
        ..Default::default()
    };
    let mut out = engine.generate(&req, &mut |_| Control::Continue).unwrap();
    let s = out.sequences.remove(0);
    (s.output_ids, s.logits.unwrap())
}

/// A schedule: who joins at which step, how many rows, how prompts are chunked, how drafts come.
pub struct Schedule {
    pub joins: Vec<usize>,
    pub max_batch: usize,
    pub chunk: Option<usize>,
    pub speculation: Speculation,
}

pub fn lookup(k: usize) -> Speculation {
    Speculation {
        source: DraftSource::PromptLookup { max_ngram: 2 },
        draft_tokens: k,
        ..Default::default()
    }
}

/// Runs `prompts` under `s`; returns each sequence's tokens and logits, and the counters.
pub fn scheduled(
    engine: &mut Engine,
    mut draft: Option<&mut Engine>,
    prompts: &[Vec<u32>],
    n: usize,
    sampling: &SamplingParams,
    s: &Schedule,
) -> (Vec<Generated>, rabbitllm::core::step::StepStats) {
    let capacity = prompts.iter().map(Vec::len).max().unwrap() + n;
    let opts = SchedulerOptions {
        max_batch: s.max_batch,
        capacity,
        prefill_chunk: s.chunk,
        speculation: s.speculation.clone(),
    };
    let mut sched = Scheduler::new(engine, draft.as_deref(), opts).unwrap();
    let mut out: Vec<Option<(Vec<u32>, Vec<f32>)>> = vec![None; prompts.len()];
    let mut ids = vec![usize::MAX; prompts.len()];
    let mut step = 0;
    let mut events: std::collections::HashMap<usize, Vec<(u32, TokenLogprobs)>> =
        Default::default();
    loop {
        for (i, p) in prompts.iter().enumerate() {
            if s.joins[i] == step {
                let req = SequenceRequest {
                    prompt: p.clone(),
                    max_new_tokens: n,
                    sampling: sampling.clone(),
                    eos_token_ids: vec![],
                    keep_logits: true,
                    logprobs: Some(3),
                };
                ids[i] = sched.add(engine, req).unwrap();
            }
        }
        let all_joined = s.joins.iter().all(|&j| j <= step);
        if all_joined && sched.is_idle() {
            break;
        }
        let report = sched
            .step(engine, draft.as_deref_mut(), &mut |ev| {
                let lp = ev
                    .logprobs
                    .expect("log-probabilities were asked for")
                    .clone();
                events.entry(ev.sequence).or_default().push((ev.token, lp));
                Control::Continue
            })
            .unwrap();
        for f in report.finished {
            let i = ids.iter().position(|&id| id == f.id).unwrap();
            let logits = f.output.logits.unwrap();
            // Each event's log-probabilities are those of the position its token came from,
            // whatever the schedule (chunks, drafts accepted or not).
            let seen = events.remove(&f.id).unwrap_or_default();
            assert_eq!(seen.len(), f.output.output_ids.len());
            let vocab = logits.len() / seen.len().max(1);
            for (k, (token, lp)) in seen.iter().enumerate() {
                assert_eq!(*token, f.output.output_ids[k]);
                let row = &logits[k * vocab..(k + 1) * vocab];
                assert_eq!(*lp, TokenLogprobs::from_logits(row, *token, 3));
            }
            out[i] = Some((f.output.output_ids, logits));
        }
        step += 1;
        assert!(step < 10_000, "the schedule does not finish");
    }
    (
        out.into_iter().map(Option::unwrap).collect(),
        sched.stats.clone(),
    )
}

/// The fixture's prompts plus one that repeats itself (prompt lookup finds drafts in it) and a
/// one-token prompt.
pub fn prompts(case: &Case) -> Vec<Vec<u32>> {
    let mut p: Vec<Vec<u32>> = case.sequences().into_iter().map(|s| s.0).collect();
    let first = p[0].clone();
    let half = &first[..first.len().min(6)];
    p.push(half.iter().chain(half).chain(half).copied().collect());
    p.push(vec![first[0]]);
    p
}
