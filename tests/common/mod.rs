//! Helpers of the parity tests: loading a fixture of `tests/fixtures` (made by the scripts there
//! with transformers) and comparing a model against it.
#![allow(dead_code)]

pub mod step;

use std::path::{Path, PathBuf};

use rabbitllm::{
    AutoModel, Control, DType, DeviceSpec, GenerateRequest, LoadOptions, Model, SamplingParams,
};
use safetensors::SafeTensors;
use serde_json::Value;

pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

pub struct Case {
    pub dir: PathBuf,
    pub expected: Value,
    logits: Vec<u8>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = fixture(name);
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let logits = std::fs::read(dir.join("expected_logits.safetensors")).unwrap();
        Case {
            dir,
            expected,
            logits,
        }
    }

    pub fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.logits).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        let data = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), data)
    }

    pub fn sequences(&self) -> Vec<(Vec<u32>, Vec<u32>)> {
        self.expected["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ids = |k: &str| {
                    s[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_u64().unwrap() as u32)
                        .collect()
                };
                (ids("input_ids"), ids("greedy_output_ids"))
            })
            .collect()
    }

    /// A copy of the case's directory with `config.alt.json` (the classic config layout) as its
    /// config.json.
    pub fn alt_config_dir(&self) -> tempfile::TempDir {
        let alt = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, alt.path().join(p.file_name().unwrap())).unwrap();
        }
        std::fs::copy(
            self.dir.join("config.alt.json"),
            alt.path().join("config.json"),
        )
        .unwrap();
        alt
    }

    pub fn open(&self, dtype: DType, split: &Path) -> Model {
        self.open_dir(&self.dir, dtype, split)
    }

    pub fn open_dir(&self, dir: &Path, dtype: DType, split: &Path) -> Model {
        AutoModel::from_pretrained(
            dir.to_str().unwrap(),
            // Every layer streamed: the path under test (residency has its own test below).
            LoadOptions::default()
                .device(DeviceSpec::Cpu)
                .dtype(dtype)
                .split_dir(split)
                .resident_layers(0),
        )
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
    }

    /// The case in f32 with the default residency plan, under a device budget if given.
    pub fn open_planned(&self, split: &Path, budget: Option<u64>) -> Model {
        let mut opts = LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::F32)
            .split_dir(split);
        if let Some(b) = budget {
            opts = opts.device_memory_budget(b);
        }
        AutoModel::from_pretrained(self.dir.to_str().unwrap(), opts)
            .unwrap_or_else(|e| panic!("loading {}: {e}", self.dir.display()))
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn greedy(
    model: &mut Model,
    seqs: Vec<Vec<u32>>,
    n: usize,
    sampling: SamplingParams,
) -> rabbitllm::GenerateOutput {
    let req = GenerateRequest {
        sequences: seqs,
        max_new_tokens: n,
        sampling,
        eos_token_ids: vec![],
        keep_logits: true,
        ..Default::default()
    };
    model.generate(&req, &mut |_| Control::Continue).unwrap()
}

/// f32: logits within 1e-4 absolute of transformers at every prompt position and every one of 32
/// greedy steps, and identical tokens.
pub fn check_f32(name: &str) {
    let case = Case::load(name);
    let tmp = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, tmp.path());
    for (i, (input, want)) in case.sequences().into_iter().enumerate() {
        let (shape, prefill) = case.tensor(&format!("prefill.{i}"));
        let got = model.engine.prompt_logits(&input).unwrap();
        let d = max_abs_diff(&got, &prefill);
        assert!(
            d < 1e-4,
            "{name} seq {i}: prefill logits differ by {d} (shape {shape:?})"
        );

        let out = greedy(
            &mut model,
            vec![input.clone()],
            want.len(),
            SamplingParams::default(),
        );
        let s = &out.sequences[0];
        assert_eq!(s.output_ids, want, "{name} seq {i}: greedy tokens differ");
        let (_, expected) = case.tensor(&format!("logits.{i}"));
        let d = max_abs_diff(s.logits.as_ref().unwrap(), &expected);
        assert!(d < 1e-4, "{name} seq {i}: step logits differ by {d}");
    }
}

/// All prompts of a case in one left-padded batch give the tokens and logits transformers gives
/// for each prompt alone.
pub fn check_batch(name: &str) {
    let case = Case::load(name);
    let tmp = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, tmp.path());
    let seqs = case.sequences();
    assert!(
        seqs.iter()
            .map(|s| s.0.len())
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1
    );
    let out = greedy(
        &mut model,
        seqs.iter().map(|s| s.0.clone()).collect(),
        seqs[0].1.len(),
        SamplingParams::default(),
    );
    for (i, (s, (_, want))) in out.sequences.iter().zip(&seqs).enumerate() {
        assert_eq!(&s.output_ids, want, "{name}: batch row {i}");
        let (_, expected) = case.tensor(&format!("logits.{i}"));
        let d = max_abs_diff(s.logits.as_ref().unwrap(), &expected);
        assert!(d < 1e-4, "{name}: batch row {i}: logits differ by {d}");
    }
}

/// The layers transformers built with a window (`attention.windowed_layers` in expected.json),
/// as `ModelSpec::sliding_windows` says.
pub fn expected_windows(case: &Case) -> Vec<Option<usize>> {
    let attention = &case.expected["attention"];
    let w = attention["sliding_window"].as_u64().unwrap() as usize;
    let windowed: Vec<u64> = attention["windowed_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let layers = case.expected["model"]["num_hidden_layers"]
        .as_u64()
        .unwrap();
    (0..layers)
        .map(|i| windowed.contains(&i).then_some(w))
        .collect()
}

/// A sliding-window case: the windowed layers are the ones transformers windows, each prompt
/// alone matches transformers at every prompt position and 32 greedy steps (past the window),
/// and a left-padded batch of all prompts gives each prompt's own result.
pub fn check_window(name: &str) {
    let case = Case::load(name);
    let tmp = tempfile::tempdir().unwrap();
    let model = case.open(DType::F32, tmp.path());
    assert_eq!(
        model.engine.spec().sliding_windows,
        expected_windows(&case),
        "{name}: windowed layers"
    );
    let seqs = case.sequences();
    let lens: std::collections::HashSet<usize> = seqs.iter().map(|s| s.0.len()).collect();
    assert!(lens.len() > 1, "{name}: prompts of different lengths");
    drop(model);
    check_f32(name);
    check_batch(name);
}

/// A bf16 case: f32 compute over the bf16 weights within 1e-4 of transformers; bf16 compute
/// within `tol` at every prompt position and along the greedy path, tokens parting only at
/// transformers' own near-ties.
pub fn check_bf16(name: &str, tol: f32) {
    let case = Case::load(name);
    let tmp = tempfile::tempdir().unwrap();
    let mut model = case.open(DType::F32, tmp.path());
    let seqs = case.sequences();
    for (i, (input, _)) in seqs.iter().enumerate() {
        let (_, prefill) = case.tensor(&format!("prefill_f32.{i}"));
        let d = max_abs_diff(&model.engine.prompt_logits(input).unwrap(), &prefill);
        assert!(
            d < 1e-4,
            "f32 compute over bf16 weights: prefill differs by {d}"
        );
    }
    drop(model);
    let mut model = case.open(DType::BF16, tmp.path());
    for (i, (input, want)) in seqs.iter().enumerate() {
        let (_, prefill) = case.tensor(&format!("prefill.{i}"));
        let d = max_abs_diff(&model.engine.prompt_logits(input).unwrap(), &prefill);
        assert!(d < tol, "bf16 prefill differs by {d}");
        let out = greedy(
            &mut model,
            vec![input.clone()],
            want.len(),
            SamplingParams::default(),
        );
        let got = &out.sequences[0].output_ids;
        let margins: Vec<f32> = case.expected["sequences"][i]["top2_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let (_, expected) = case.tensor(&format!("logits.{i}"));
        let vocab = expected.len() / want.len();
        let ours = out.sequences[0].logits.as_ref().unwrap();
        // Walk the path: logits must agree step by step; the tokens may only part ways at a step
        // where transformers itself had a near-tie (margin within twice the noise). After that the
        // paths differ and comparison ends.
        for k in 0..want.len() {
            let row = k * vocab..(k + 1) * vocab;
            let d = max_abs_diff(&ours[row.clone()], &expected[row]);
            assert!(d < tol, "seq {i} step {k}: bf16 logits differ by {d}");
            if got[k] != want[k] {
                assert!(
                    margins[k] < 2.0 * tol,
                    "seq {i} step {k}: token {} vs transformers' {} with a clear margin {}",
                    got[k],
                    want[k],
                    margins[k]
                );
                break;
            }
        }
    }
}
