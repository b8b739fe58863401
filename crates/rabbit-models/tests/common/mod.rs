//! Helpers shared by the tests of `rabbit_models::synth`.
//!
//! Each file under `tests/` is its own crate and uses only some of these helpers, so the ones a
//! given test binary leaves unused would otherwise each warn there.
#![allow(dead_code)]

use std::path::Path;

use rabbit_models::synth::{synthesize, SynthOptions, SynthReport};

/// Every family synth writes.
pub const ARCHES: [&str; 10] = [
    "qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3", "phi3", "phi", "glm4", "glm",
];

pub fn opts(arch: &str, preset: &str, dir: &Path) -> SynthOptions {
    SynthOptions::new(arch, preset, dir)
}

pub fn run(o: &SynthOptions) -> SynthReport {
    synthesize(o, &mut |_| {}).unwrap_or_else(|e| panic!("synthesize {o:?}: {e}"))
}
