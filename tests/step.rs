//! The step-level engine: any schedule (joins at any step, a queue, prefill chunks, verify
//! widths) gives each sequence exactly the tokens and float32 logits it gets alone; finished,
//! cancelled and failed sequences leave their rows without disturbing the others. Speculative
//! decoding is tested in speculation.rs.

mod common;

use common::step::*;
use common::*;
use rabbitllm::core::step::{Scheduler, SchedulerOptions, SequenceRequest, Speculation};
use rabbitllm::{Control, DType, GenerateRequest, SamplingParams};

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
