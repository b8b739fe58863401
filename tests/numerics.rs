//! Generation never turns NaN/inf into a plausible token: non-finite logits stop it with an error
//! naming the step and the sequence, and sampling settings that overflow float32 are refused by
//! name. Uses the committed transformers fixtures (`tests/fixtures`), with a NaN written into a
//! copy of the checkpoint.

use std::path::{Path, PathBuf};

use rabbitllm::{
    AutoModel, Control, CoreError, DType, DeviceSpec, GenerateRequest, LoadOptions, Model,
    SamplingParams,
};
use serde_json::Value;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

/// The fixture's first prompt and its 32 greedy tokens.
fn sequence(case: &str) -> (Vec<u32>, Vec<u32>) {
    let e: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(case).join("expected.json")).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| {
        e["sequences"][0][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    (ids("input_ids"), ids("greedy_output_ids"))
}

/// A copy of the fixture checkpoint in `dir` whose embedding row `row` is NaN (f32 weights).
fn with_nan_embedding_row(case: &str, dir: &Path, row: usize) {
    for entry in std::fs::read_dir(fixture(case)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let t = &header["model.embed_tokens.weight"];
    assert_eq!(t["dtype"], "F32");
    let hidden = t["shape"][1].as_u64().unwrap() as usize;
    let start = 8 + header_len + t["data_offsets"][0].as_u64().unwrap() as usize;
    for j in 0..hidden {
        let at = start + (row * hidden + j) * 4;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

fn open(dir: &Path, split: &Path) -> Model {
    AutoModel::from_pretrained(
        dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::F32)
            .split_dir(split),
    )
    .unwrap()
}

fn generate(model: &mut Model, sequences: Vec<Vec<u32>>, sampling: SamplingParams) -> CoreError {
    let req = GenerateRequest {
        sequences,
        max_new_tokens: 32,
        sampling,
        ..Default::default()
    };
    match model.engine.generate(&req, &mut |_| Control::Continue) {
        Ok(out) => panic!(
            "generated {:?} from non-finite logits",
            out.sequences
                .iter()
                .map(|s| s.output_ids.clone())
                .collect::<Vec<_>>()
        ),
        Err(e) => e,
    }
}

/// A NaN embedding row of a token the model generates at step k poisons the logits of step
/// k + 1: generation stops there with an error naming that step (before: token 0, exit 0).
#[test]
fn nan_logits_stop_generation_at_the_step_they_appear() {
    let case = "qwen2_untied_f32"; // untied: the NaN row does not reach the LM head
    let (prompt, want) = sequence(case);
    // The first generated token that neither the prompt nor an earlier step contains.
    let k = (0..want.len())
        .find(|&k| !prompt.contains(&want[k]) && !want[..k].contains(&want[k]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();
    with_nan_embedding_row(case, dir.path(), want[k] as usize);
    let mut model = open(dir.path(), split.path());
    let e = generate(&mut model, vec![prompt], SamplingParams::default());
    match &e {
        CoreError::NonFiniteLogits {
            step,
            sequence,
            value,
            ..
        } => {
            assert_eq!((*step, *sequence), (k + 1, 0), "{e}");
            assert!(value.is_nan());
        }
        other => panic!("expected NonFiniteLogits, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&format!("step {}", k + 1)) && msg.contains("sequence 0"));
}

/// In a batch, the error names the sequence whose logits are not finite (rows do not mix).
#[test]
fn nan_logits_name_the_sequence_in_a_batch() {
    let case = "qwen2_untied_f32";
    let (prompt, _) = sequence(case);
    let poisoned = prompt[prompt.len() / 2];
    let clean: Vec<u32> = (0..6u32).filter(|t| !prompt.contains(t)).collect();
    // Pads are id 0: keep them clean (a NaN value times a masked weight of 0 is still NaN).
    assert!(!clean.contains(&poisoned) && poisoned != 0);
    let dir = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();
    with_nan_embedding_row(case, dir.path(), poisoned as usize);
    let mut model = open(dir.path(), split.path());
    let e = generate(&mut model, vec![clean, prompt], SamplingParams::default());
    assert!(
        matches!(
            e,
            CoreError::NonFiniteLogits {
                step: 0,
                sequence: 1,
                ..
            }
        ),
        "{e:?}"
    );
}

/// A temperature below float32's normal range is refused by name before any compute; a tiny
/// one that keeps these logits finite gives the greedy limit, as transformers does.
#[test]
fn tiny_temperatures_are_refused_or_give_the_greedy_limit() {
    let case = "qwen2_untied_f32";
    let (prompt, want) = sequence(case);
    let split = tempfile::tempdir().unwrap();
    let mut model = open(&fixture(case), split.path());
    let sampling = |temperature: f64| SamplingParams {
        temperature,
        seed: 3,
        ..Default::default()
    };
    let e = generate(&mut model, vec![prompt.clone()], sampling(1e-38));
    assert!(
        matches!(e, CoreError::InvalidInput(_)) && e.to_string().contains("temperature"),
        "{e}"
    );
    let req = GenerateRequest {
        sequences: vec![prompt],
        max_new_tokens: want.len(),
        sampling: sampling(1e-30),
        ..Default::default()
    };
    let out = model.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_eq!(out.sequences[0].output_ids, want);
}
