//! Speculative decoding through the step engine: prompt lookup and draft models give plain
//! greedy decoding's tokens, speculative sampling keeps the target's distribution (a chi-square
//! bound over many seeded runs), bad settings are refused by name, and compressed models work.

mod common;

use common::step::*;
use common::*;
use rabbitllm::core::step::{DraftSource, Speculation};
use rabbitllm::{Control, DType, GenerateRequest, SamplingParams};

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
