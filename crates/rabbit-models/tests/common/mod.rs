//! Helpers shared by the tests of `rabbit_models` (synth, chat).
//!
//! Each file under `tests/` is its own crate and uses only some of these helpers, so the ones a
//! given test binary leaves unused would otherwise each warn there.
#![allow(dead_code)]

use std::path::Path;

use rabbit_models::synth::{synthesize, SynthOptions, SynthReport};

/// Every family synth writes.
pub const ARCHES: [&str; 15] = [
    "qwen2",
    "qwen3",
    "llama",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "phi",
    "glm4",
    "glm",
    "chatglm",
    "internlm2",
    "internlm",
    "baichuan",
    "qwen1",
];

/// Families whose attention has no grouped keys: tiny gets as many key/value heads as heads.
pub const NO_GQA: [&str; 3] = ["internlm", "baichuan", "qwen1"];

pub fn opts(arch: &str, preset: &str, dir: &Path) -> SynthOptions {
    SynthOptions::new(arch, preset, dir)
}

pub fn run(o: &SynthOptions) -> SynthReport {
    synthesize(o, &mut |_| {}).unwrap_or_else(|e| panic!("synthesize {o:?}: {e}"))
}

/// First differing byte, with some context, for readable failures.
pub fn diff_hint(got: &str, want: &str) -> String {
    let pos = got
        .bytes()
        .zip(want.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |s: &str| {
        let mut lo = pos.saturating_sub(40).min(s.len());
        while !s.is_char_boundary(lo) {
            lo -= 1;
        }
        let mut hi = (pos + 40).min(s.len());
        while !s.is_char_boundary(hi) {
            hi += 1;
        }
        format!("{:?}", &s[lo..hi])
    };
    format!(
        "first difference at byte {pos}: got {} / want {}",
        ctx(got),
        ctx(want)
    )
}
