//! `rabbit synth`: a complete HF-format checkpoint with seeded random weights.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use rabbit_models::synth::{
    derive_like, synthesize, LikeOptions, SynthDtype, SynthOptions, SynthOverrides,
};

use crate::out::outln;
use crate::report::human_bytes;

/// Arguments of `rabbit synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Architecture family: qwen2, qwen3, llama, mistral, gemma2, gemma3, phi3, phi, glm4, glm,
    /// chatglm, internlm2, internlm, baichuan, qwen1, mixtral, qwen2_moe or qwen3_moe
    /// (`rabbit info` lists them).
    #[arg(long, required_unless_present = "like")]
    arch: Option<String>,
    /// Derive from this checkpoint instead (e.g. a draft for speculative-decoding benchmarks):
    /// its first --layers layers, every weight plus --noise × its standard deviation.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["arch", "preset", "shards", "dtype", "hidden",
          "intermediate", "heads", "kv_heads", "head_dim", "vocab", "max_position",
          "tie_word_embeddings", "rope_theta", "experts", "experts_per_token", "moe_intermediate"])]
    like: Option<PathBuf>,
    /// With --like: Gaussian noise, in units of each tensor's standard deviation (0: a copy).
    #[arg(long, requires = "like", allow_hyphen_values = true)]
    noise: Option<f64>,
    /// Shape preset: tiny, or a real model's shape (qwen2.5-0.5b, qwen2.5-1.5b, qwen3-0.6b, ...).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Number of weight shards (1 = a single model.safetensors).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Storage dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16", value_name = "f32|bf16|f16")]
    dtype: SynthDtype,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override: decoder layers (with --like: the first N layers are kept).
    #[arg(long)]
    layers: Option<usize>,
    /// Override: hidden size.
    #[arg(long)]
    hidden: Option<usize>,
    /// Override: MLP intermediate size.
    #[arg(long)]
    intermediate: Option<usize>,
    /// Override: attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Override: key/value heads.
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Override: head dimension.
    #[arg(long)]
    head_dim: Option<usize>,
    /// Override: vocabulary size (rows of embedding / LM head).
    #[arg(long)]
    vocab: Option<usize>,
    /// Override: max_position_embeddings.
    #[arg(long)]
    max_position: Option<usize>,
    /// Override: tie the LM head to the embedding (true/false).
    #[arg(long)]
    tie_word_embeddings: Option<bool>,
    /// Override: RoPE base.
    #[arg(long)]
    rope_theta: Option<f64>,
    /// Override (mixtures of experts): routed experts per sparse layer.
    #[arg(long)]
    experts: Option<usize>,
    /// Override (mixtures of experts): experts each token is routed to.
    #[arg(long)]
    experts_per_token: Option<usize>,
    /// Override (Qwen-MoE): each expert's MLP width (Mixtral's is --intermediate).
    #[arg(long)]
    moe_intermediate: Option<usize>,
}

/// Runs `rabbit synth`.
pub fn run(a: SynthArgs) -> Result<()> {
    if a.noise.is_some() && a.like.is_none() {
        anyhow::bail!("--noise needs --like (it perturbs a copy of an existing checkpoint)");
    }
    if let Some(target) = &a.like {
        let start = std::time::Instant::now();
        let r = derive_like(&LikeOptions {
            target: target.clone(),
            out_dir: a.out.clone(),
            layers: a.layers,
            noise: a.noise.unwrap_or(0.0),
            seed: a.seed,
        })
        .with_context(|| {
            format!(
                "writing {} from --like {}",
                a.out.display(),
                target.display()
            )
        })?;
        outln!(
            "{}: {}/{} layers of {}, noise {}, {} tensors, {}, {:.2} s",
            r.out_dir.display(),
            r.layers.0,
            r.layers.1,
            target.display(),
            a.noise.unwrap_or(0.0),
            r.tensors,
            human_bytes(r.bytes),
            start.elapsed().as_secs_f64()
        )?;
        return Ok(());
    }
    let opts = SynthOptions {
        arch: a.arch.unwrap_or_default(),
        preset: a.preset,
        out_dir: a.out.clone(),
        shards: a.shards,
        dtype: a.dtype,
        seed: a.seed,
        overrides: SynthOverrides {
            layers: a.layers,
            hidden: a.hidden,
            intermediate: a.intermediate,
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
            vocab: a.vocab,
            max_position: a.max_position,
            tie_word_embeddings: a.tie_word_embeddings,
            rope_theta: a.rope_theta,
            experts: a.experts,
            experts_per_token: a.experts_per_token,
            moe_intermediate: a.moe_intermediate,
        },
    };
    let start = std::time::Instant::now();
    let report =
        synthesize(&opts, &mut |_| {}).with_context(|| format!("writing {}", a.out.display()))?;
    outln!(
        "{}: {} parameters, {} in {} file(s){}, {:.2} s",
        report.out_dir.display(),
        report.num_parameters,
        human_bytes(report.total_bytes),
        report.files.len(),
        if report.reused {
            " (already there with these options, reused)"
        } else {
            ""
        },
        start.elapsed().as_secs_f64()
    )?;
    Ok(())
}
