//! The step-engine options shared by `generate`, `chat` and `bench`: chunked prefill and
//! speculative decoding (prompt lookup or a resident draft model).

use anyhow::{bail, Context, Result};
use clap::Args;
use rabbit_core::step::{MAX_DRAFT_TOKENS, MAX_LOOKUP_NGRAM};
use rabbit_core::{DraftSource, Speculation};
use rabbitllm::Model;

use crate::load::ModelArgs;
use crate::out::note;

/// Chunked prefill and speculative decoding.
#[derive(Args, Clone, Default)]
pub struct StepArgs {
    /// Prefill long prompts N tokens per sweep (bounds activation memory; a prompt goes in one
    /// sweep by default).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill_chunk: Option<u64>,
    /// Speculate with prompt lookup: drafts copied from earlier matches of the last N tokens
    /// (N defaults to 3); no draft model. Pays on outputs that repeat their input (code edits,
    /// summaries, extraction).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "3",
          conflicts_with = "draft_model",
          value_parser = clap::value_parser!(u64).range(1..=MAX_LOOKUP_NGRAM as u64))]
    pub prompt_lookup: Option<u64>,
    /// Speculate with this draft model (directory or hub repo id), kept resident; it must share
    /// the model's tokenizer (typically a small model of the same family).
    #[arg(long, value_name = "DIR|REPO")]
    pub draft_model: Option<String>,
    /// Drafts verified per sweep.
    #[arg(long, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..=MAX_DRAFT_TOKENS as u64))]
    pub draft_tokens: Option<u64>,
    /// Adapt K to each sequence's acceptance, starting at --draft-tokens: +2 after a sweep that
    /// accepted every draft, -1 after one that rejected some (transformers' heuristic).
    #[arg(long)]
    pub adaptive_draft: bool,
}

impl StepArgs {
    /// The speculation the flags ask for (checked before any model is loaded).
    pub fn speculation(&self) -> Result<Speculation> {
        let source = match (&self.prompt_lookup, &self.draft_model) {
            (Some(n), _) => DraftSource::PromptLookup {
                max_ngram: *n as usize,
            },
            (None, Some(_)) => DraftSource::Model,
            (None, None) => {
                if self.draft_tokens.is_some() {
                    bail!("--draft-tokens needs --prompt-lookup or --draft-model");
                }
                if self.adaptive_draft {
                    bail!("--adaptive-draft needs --prompt-lookup or --draft-model");
                }
                DraftSource::None
            }
        };
        let s = Speculation {
            draft_tokens: if source == DraftSource::None {
                0
            } else {
                self.draft_tokens.unwrap_or(4) as usize
            },
            adaptive: self.adaptive_draft,
            source,
        };
        s.validate()?;
        Ok(s)
    }

    /// The prefill chunk.
    pub fn prefill_chunk(&self) -> Option<usize> {
        self.prefill_chunk.map(|n| n as usize)
    }

    /// Loads the draft model next to `model` (same device, dtype and memory options, every
    /// layer resident) when asked for.
    pub fn load_draft(&self, target: &ModelArgs, model: &mut Model, quiet: bool) -> Result<()> {
        let Some(dir) = &self.draft_model else {
            return Ok(());
        };
        let mut args = target.clone();
        args.model = dir.clone();
        args.resident_layers = Some(usize::MAX);
        args.device_memory_budget = None;
        args.compression = None;
        args.compress_embeddings = false;
        args.delete_original = false;
        args.split_dir = None;
        if !quiet {
            note!("loading the draft model {dir}");
        }
        let (draft, _) = args
            .load(true)
            .with_context(|| format!("--draft-model {dir}"))?;
        model
            .set_draft(draft)
            .with_context(|| format!("--draft-model {dir}"))?;
        Ok(())
    }
}
