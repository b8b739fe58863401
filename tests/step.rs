//! The step-level engine: any schedule (joins at any step, a queue, prefill chunks, verify
//! widths) gives each sequence exactly the tokens and float32 logits it gets alone; speculative
//! decoding (prompt lookup, a draft model) gives plain greedy decoding's tokens, and speculative
//! sampling keeps the target's distribution (a chi-square bound over many seeded runs).

mod common;

use common::*;
use rabbitllm::core::step::{
    DraftSource, Scheduler, SchedulerOptions, SequenceRequest, Speculation, TokenLogprobs,
};
use rabbitllm::core::Engine;
use rabbitllm::{Control, DType, GenerateRequest, SamplingParams};

/// `case` with every layer streamed, and its split directory (kept while the model lives).
fn open(case: &Case, dtype: DType) -> (rabbitllm::Model, tempfile::TempDir) {
    let split = tempfile::tempdir().unwrap();
    (case.open(dtype, split.path()), split)
}

/// A sequence's tokens and float32 logits.
type Generated = (Vec<u32>, Vec<f32>);

/// Tokens and logits of one sequence generated alone (plain decoding, no chunks).
fn alone(
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
struct Schedule {
    joins: Vec<usize>,
    max_batch: usize,
    chunk: Option<usize>,
    speculation: Speculation,
}

fn lookup(k: usize) -> Speculation {
    Speculation {
        source: DraftSource::PromptLookup { max_ngram: 2 },
        draft_tokens: k,
        ..Default::default()
    }
}

/// Runs `prompts` under `s`; returns each sequence's tokens and logits, and the counters.
fn scheduled(
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
fn prompts(case: &Case) -> Vec<Vec<u32>> {
    let mut p: Vec<Vec<u32>> = case.sequences().into_iter().map(|s| s.0).collect();
    let first = p[0].clone();
    let half = &first[..first.len().min(6)];
    p.push(half.iter().chain(half).chain(half).copied().collect());
    p.push(vec![first[0]]);
    p
}

fn check_schedules(name: &str, sampling: SamplingParams) {
    let case = Case::load(name);
    let split = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, split.path());
    let engine = &mut model.engine;
    let prompts = prompts(&case);
    let n = 12;
    let want: Vec<_> = prompts
        .iter()
        .map(|p| alone(engine, p, n, &sampling))
        .collect();
    let k = prompts.len();
    let schedules = [
        // Everyone at once, prompts in chunks of 3.
        Schedule {
            joins: vec![0; k],
            max_batch: k,
            chunk: Some(3),
            speculation: Speculation::default(),
        },
        // Staggered joins, two rows (the rest queue), chunks of 5, prompt lookup K = 3.
        Schedule {
            joins: (0..k).map(|i| i * 2).collect(),
            max_batch: 2,
            chunk: Some(5),
            speculation: lookup(3),
        },
        // Late joiners into a running batch, one-token chunks, wide verifies.
        Schedule {
            joins: (0..k).map(|i| [0, 3, 1, 7][i % 4]).collect(),
            max_batch: 3,
            chunk: Some(1),
            speculation: lookup(6),
        },
        // Adaptive verify widths (each sequence its own K, moving with its acceptance).
        Schedule {
            joins: (0..k).map(|i| i % 2).collect(),
            max_batch: k,
            chunk: Some(2),
            speculation: Speculation {
                adaptive: true,
                ..lookup(2)
            },
        },
    ];
    for (si, s) in schedules.iter().enumerate() {
        let (got, _) = scheduled(engine, None, &prompts, n, &sampling, s);
        for (i, ((gt, gl), (wt, wl))) in got.iter().zip(&want).enumerate() {
            assert_eq!(gt, wt, "{name}: schedule {si}, sequence {i}: tokens");
            let d = max_abs_diff(gl, wl);
            assert!(
                d <= 1e-4,
                "{name}: schedule {si}, sequence {i}: logits differ by {d}"
            );
        }
    }
}

#[test]
fn any_schedule_gives_each_sequence_what_it_gets_alone() {
    // Llama lineage, sliding windows, Gemma's soft-caps and local rope, LongRoPE (a prompt
    // past and one below the switch), ALiBi, QWen's logn + dynamic NTK, GLM.
    for name in [
        "qwen2_batch",
        "mistral_window_batch",
        "gemma2",
        "gemma3",
        "phi3_longrope",
        "baichuan2_13b",
        "qwen",
        "chatglm3",
    ] {
        check_schedules(name, SamplingParams::default());
    }
}

#[test]
fn schedules_keep_sampled_sequences_and_the_repetition_penalty() {
    // Without speculation a schedule does not touch a sequence's random stream; with prompt
    // lookup the draws differ (they are tested for their law below), so only greedy with a
    // penalty goes through the speculative schedules here.
    check_schedules(
        "qwen2_sampling",
        SamplingParams {
            repetition_penalty: Some(1.3),
            ..Default::default()
        },
    );
    let case = Case::load("qwen2_sampling");
    let split = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, split.path());
    let engine = &mut model.engine;
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: Some(20),
        seed: 5,
        ..Default::default()
    };
    let prompts = prompts(&case);
    let want: Vec<_> = prompts
        .iter()
        .map(|p| alone(engine, p, 10, &sampling))
        .collect();
    let s = Schedule {
        joins: (0..prompts.len()).map(|i| i * 3).collect(),
        max_batch: 2,
        chunk: Some(2),
        speculation: Speculation::default(),
    };
    let (got, _) = scheduled(engine, None, &prompts, 10, &sampling, &s);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "sampled sequence {i}");
    }
}

/// Greedy speculation with a draft model: the target itself (everything accepted) and another
/// model of the same vocabulary (most drafts rejected) both give plain greedy's tokens.
#[test]
fn greedy_speculation_with_a_draft_model_gives_plain_greedy_tokens() {
    let case = Case::load("qwen2_batch");
    let other = Case::load("mistral");
    let (mut target, _s1) = open(&case, DType::F32);
    let (mut same, _s2) = open(&case, DType::F32);
    let (mut different, _s3) = open(&other, DType::F32);
    let prompts = prompts(&case);
    let n = 16;
    let greedy = SamplingParams::default();
    let want: Vec<_> = prompts
        .iter()
        .map(|p| alone(&mut target.engine, p, n, &greedy))
        .collect();
    for (label, draft, full) in [
        ("same model", &mut same.engine, true),
        ("other model", &mut different.engine, false),
    ] {
        let s = Schedule {
            joins: (0..prompts.len()).map(|i| i % 3).collect(),
            max_batch: 3,
            chunk: Some(4),
            speculation: Speculation {
                source: DraftSource::Model,
                draft_tokens: 4,
                ..Default::default()
            },
        };
        let (got, stats) = scheduled(&mut target.engine, Some(draft), &prompts, n, &greedy, &s);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.0, w.0, "{label}: sequence {i}");
            let d = max_abs_diff(&g.1, &w.1);
            assert!(d <= 1e-4, "{label}: sequence {i}: logits differ by {d}");
        }
        assert!(stats.draft_tokens > 0, "{label}: no drafts were made");
        if full {
            assert_eq!(stats.accepted_tokens, stats.draft_tokens, "{label}");
            assert!(
                stats.sweeps < prompts.len() * n / 2,
                "{label}: {} sweeps",
                stats.sweeps
            );
        } else {
            assert!(stats.accepted_tokens < stats.draft_tokens, "{label}");
        }
    }
}

/// Speculative sampling keeps the target's law: the first two sampled tokens (the second goes
/// through a verify) over 2000 seeds, against the exact pair distribution computed from the
/// target's logits, for a draft that mostly agrees (the target in bf16: the accept path) and one
/// that never does (another model: the resample path; the unit tests of `verify` cover partial
/// overlap). top-k 4 gives 16 cells; the 99.9% quantile of chi-square with 15 degrees of freedom
/// is 37.7 (the seeds are fixed: the test is deterministic).
#[test]
fn speculative_sampling_keeps_the_target_distribution() {
    let case = Case::load("qwen2_sampling");
    let other = Case::load("mistral");
    let (mut target, _s1) = open(&case, DType::F32);
    let (mut close, _s2) = open(&case, DType::BF16);
    let (mut far, _s3) = open(&other, DType::F32);
    let prompt = case.sequences()[0].0.clone();
    let params = |seed| SamplingParams {
        temperature: 1.5,
        top_k: Some(4),
        seed,
        ..Default::default()
    };
    let law = |scores: &[f32]| -> Vec<(u32, f64)> {
        let mut s = scores.to_vec();
        let p = rabbitllm::core::sampling::distribution(&mut s, &[], &params(0)).unwrap();
        p.iter()
            .enumerate()
            .filter(|(_, &x)| x > 0.0)
            .map(|(i, &x)| (i as u32, x))
            .collect()
    };
    let vocab = target.engine.spec().vocab_size;
    let first = target.engine.prompt_logits(&prompt).unwrap();
    let p1 = law(&first[first.len() - vocab..]);
    let mut cells = Vec::new();
    for &(t1, a) in &p1 {
        let mut ext = prompt.clone();
        ext.push(t1);
        let l = target.engine.prompt_logits(&ext).unwrap();
        for (t2, b) in law(&l[l.len() - vocab..]) {
            cells.push(((t1, t2), a * b));
        }
    }
    assert_eq!(cells.len(), 16);
    let trials = 2000;
    for (label, draft) in [
        ("bf16 copy", &mut close.engine),
        ("other model", &mut far.engine),
    ] {
        let mut counts = vec![0u64; cells.len()];
        let (mut drafted, mut accepted) = (0, 0);
        for seed in 0..trials {
            let req = GenerateRequest {
                sequences: vec![prompt.clone()],
                max_new_tokens: 3,
                sampling: params(seed),
                speculation: Speculation {
                    source: DraftSource::Model,
                    draft_tokens: 2,
                    ..Default::default()
                },
                ..Default::default()
            };
            let out = target
                .engine
                .generate_with_draft(&req, Some(&mut *draft), &mut |_| Control::Continue)
                .unwrap();
            drafted += out.timings.draft_tokens;
            accepted += out.timings.accepted_tokens;
            let o = &out.sequences[0].output_ids;
            let cell = cells.iter().position(|c| c.0 == (o[0], o[1])).unwrap();
            counts[cell] += 1;
        }
        let x2: f64 = counts
            .iter()
            .zip(&cells)
            .map(|(&c, (_, p))| {
                let e = p * trials as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(x2 < 37.7, "{label}: chi-square {x2}: {counts:?}");
        assert!(drafted > 0, "{label}: no drafts");
        if label == "bf16 copy" {
            assert!(
                accepted * 2 > drafted,
                "{label}: {accepted}/{drafted} accepted"
            );
        } else {
            assert!(accepted < drafted, "{label}: {accepted}/{drafted} accepted");
        }
    }
}

/// Bad speculation settings are refused by name before any compute; a prompt too short for
/// lookup decodes plainly.
#[test]
fn bad_speculation_settings_are_refused_and_short_prompts_fall_back() {
    let case = Case::load("qwen2_batch");
    let split = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, split.path());
    let prompt = vec![7u32];
    for (spec, needle) in [
        (lookup(0), "draft tokens"),
        (lookup(33), "draft tokens"),
        (
            Speculation {
                source: DraftSource::PromptLookup { max_ngram: 0 },
                draft_tokens: 2,
                ..Default::default()
            },
            "n-gram",
        ),
        (
            Speculation {
                source: DraftSource::Model,
                draft_tokens: 2,
                ..Default::default()
            },
            "draft model",
        ),
    ] {
        let req = GenerateRequest {
            sequences: vec![prompt.clone()],
            max_new_tokens: 4,
            speculation: spec,
            ..Default::default()
        };
        let e = model
            .generate(&req, &mut |_| Control::Continue)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
    let req = GenerateRequest {
        sequences: vec![prompt.clone()],
        max_new_tokens: 0,
        prefill_chunk: Some(0),
        ..Default::default()
    };
    let e = model
        .generate(&req, &mut |_| Control::Continue)
        .unwrap_err();
    assert!(e.to_string().contains("prefill chunk"), "{e}");
    // A one-token prompt has nothing to look up at first: plain steps until the output
    // repeats, the same tokens.
    let want = alone(&mut model.engine, &prompt, 10, &SamplingParams::default());
    let req = GenerateRequest {
        sequences: vec![prompt],
        max_new_tokens: 10,
        speculation: lookup(4),
        keep_logits: true,
        ..Default::default()
    };
    let out = model.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_eq!(out.sequences[0].output_ids, want.0);
    // A draft with another vocabulary is refused by name.
    let other = Case::load("qwen2_untied_f32");
    let s2 = tempfile::tempdir().unwrap();
    let draft = other.open(DType::F32, s2.path());
    let e = model.set_draft(draft).unwrap_err().to_string();
    assert!(e.contains("vocabulary has 320 tokens"), "{e}");
}

/// Finished sequences free their rows for the queue; a cancelled one leaves at once, and one
/// whose sampling fails ends alone with its error: the others are unaffected.
#[test]
fn rows_are_reused_and_cancelling_one_sequence_leaves_the_others_intact() {
    let case = Case::load("qwen2_batch");
    let split = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, split.path());
    let engine = &mut model.engine;
    let prompts = prompts(&case);
    let greedy = SamplingParams::default();
    let want: Vec<_> = prompts
        .iter()
        .map(|p| alone(engine, p, 8, &greedy))
        .collect();
    let opts = SchedulerOptions {
        max_batch: 2,
        capacity: 64,
        prefill_chunk: None,
        speculation: Speculation::default(),
    };
    let mut sched = Scheduler::new(engine, None, opts).unwrap();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(
            sched
                .add(
                    engine,
                    SequenceRequest {
                        prompt: p.clone(),
                        max_new_tokens: 8,
                        sampling: greedy.clone(),
                        ..Default::default()
                    },
                )
                .unwrap(),
        );
    }
    // Scores that overflow to +inf leave nothing to sample from: this sequence fails alone.
    let doomed_sampling = SamplingParams {
        temperature: 1e-30,
        repetition_penalty: Some(1e-37),
        ..Default::default()
    };
    let doomed = sched
        .add(
            engine,
            SequenceRequest {
                prompt: prompts[0].clone(),
                max_new_tokens: 8,
                sampling: doomed_sampling.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    let too_long = SequenceRequest {
        prompt: vec![1; 60],
        max_new_tokens: 8,
        ..Default::default()
    };
    let e = sched.add(engine, too_long).unwrap_err().to_string();
    assert!(e.contains("68 > the 64 positions"), "{e}");
    let mut done = std::collections::HashMap::new();
    let mut steps = 0;
    while !sched.is_idle() {
        assert!(sched.live() <= 2);
        if steps == 2 {
            sched.cancel(ids[0]);
        }
        for f in sched
            .step(engine, None, &mut |_| Control::Continue)
            .unwrap()
            .finished
        {
            if f.id == doomed {
                let e = f.error.expect("the doomed sequence fails").to_string();
                assert!(e.contains("temperature"), "{e}");
                assert_eq!(
                    f.output.finish_reason,
                    rabbitllm::core::FinishReason::Failed
                );
                continue;
            }
            assert!(f.error.is_none());
            done.insert(f.id, f.output);
        }
        steps += 1;
    }
    let first = &done[&ids[0]];
    assert_eq!(
        first.finish_reason,
        rabbitllm::core::FinishReason::Cancelled
    );
    assert_eq!(first.output_ids[..], want[0].0[..first.output_ids.len()]);
    for (i, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(done[id].output_ids, want[i].0, "sequence {i}");
    }
    // A whole generation still fails with it.
    let req = GenerateRequest {
        sequences: vec![prompts[0].clone()],
        max_new_tokens: 4,
        sampling: doomed_sampling,
        ..Default::default()
    };
    let e = engine
        .generate(&req, &mut |_| Control::Continue)
        .unwrap_err();
    assert!(
        matches!(e, rabbitllm::CoreError::DegenerateScores { .. }),
        "{e}"
    );
}

/// Speculation on a compressed model: the same tokens as plain decoding of that model.
#[test]
fn speculation_works_on_a_compressed_model() {
    use rabbitllm::split::Compression;
    use rabbitllm::{AutoModel, DeviceSpec, LoadOptions};
    let case = Case::load("qwen2_batch");
    let split = tempfile::tempdir().unwrap();
    let mut model = AutoModel::from_pretrained(
        case.dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::F32)
            .split_dir(split.path())
            .resident_layers(0)
            .compression(Some(Compression::Nf4)),
    )
    .unwrap();
    let engine = &mut model.engine;
    let prompts = prompts(&case);
    let greedy = SamplingParams::default();
    let want: Vec<_> = prompts
        .iter()
        .map(|p| alone(engine, p, 12, &greedy))
        .collect();
    let s = Schedule {
        joins: vec![0; prompts.len()],
        max_batch: prompts.len(),
        chunk: Some(4),
        speculation: lookup(4),
    };
    let (got, stats) = scheduled(engine, None, &prompts, 12, &greedy, &s);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "sequence {i}");
    }
    assert!(stats.draft_tokens > 0);
}

/// A scheduler stays usable after a refused request, and an absurd capacity is refused by size.
#[test]
fn absurd_sizes_are_refused_by_size() {
    let case = Case::load("baichuan2_13b"); // ALiBi: no context limit from the config
    let split = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, split.path());
    let req = GenerateRequest {
        sequences: vec![vec![1, 2, 3]],
        max_new_tokens: usize::MAX,
        ..Default::default()
    };
    let e = model
        .generate(&req, &mut |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(e.contains("positions") || e.contains("context"), "{e}");
    let opts = SchedulerOptions {
        max_batch: 1,
        capacity: usize::MAX,
        prefill_chunk: None,
        speculation: Speculation::default(),
    };
    let e = Scheduler::new(&model.engine, None, opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot be allocated"), "{e}");
}
