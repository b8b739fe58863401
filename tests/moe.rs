//! Mixtures of experts against transformers (`tests/fixtures/make_moe_fixtures.py`): Mixtral,
//! Qwen2-MoE (shared expert with its sigmoid gate, a dense `mlp_only_layers` layer) and
//! Qwen3-MoE (q/k norms, `decoder_sparse_step` 2, renormalised top-k). f32 logits within 1e-4
//! at every prompt position and along 32 greedy steps, identical tokens, and a left-padded
//! batch equal to each prompt alone; every layer streamed (only the routed experts read) and,
//! separately, every layer resident, bit for bit the same.

mod common;

use common::*;
use rabbitllm::{DType, DeviceSpec, LoadOptions, SamplingParams};

/// Greedy tokens and logits with every layer resident equal the streamed run's exactly.
fn check_resident_equals_streamed(name: &str) {
    let case = Case::load(name);
    let seqs = case.sequences();
    let input: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
    let run = |resident: usize| {
        let split = tempfile::tempdir().unwrap();
        let mut model = rabbitllm::AutoModel::from_pretrained(
            case.dir.to_str().unwrap(),
            LoadOptions::default()
                .device(DeviceSpec::Cpu)
                .dtype(DType::F32)
                .split_dir(split.path())
                .resident_layers(resident),
        )
        .unwrap();
        greedy(&mut model, input.clone(), 8, SamplingParams::default())
    };
    let streamed = run(0);
    let resident = run(usize::MAX);
    for (a, b) in streamed.sequences.iter().zip(&resident.sequences) {
        assert_eq!(a.output_ids, b.output_ids, "{name}: tokens");
        assert_eq!(a.logits, b.logits, "{name}: logits must be bit-identical");
    }
}

fn check_moe(name: &str) {
    check_f32(name);
    check_batch(name);
    check_resident_equals_streamed(name);
}

#[test]
fn mixtral_matches_transformers() {
    check_moe("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_moe("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_moe("qwen3_moe");
}
