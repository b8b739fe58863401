//! Loading a model for a subcommand: the options every loading command shares, and the status
//! lines (split progress, plan, device) printed while it opens.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rabbit_core::{ByteSize, DType, DeviceSpec};
use rabbit_split::{Compression, SplitEvent};
use rabbitllm::{AutoModel, LoadEvent, LoadOptions, Model};

use crate::out::note;
use crate::report::{human_bytes, plan_line};
use crate::util::{bar, show_progress};

/// Options shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model directory (HF checkpoint) or hub repo id.
    #[arg(long)]
    pub model: String,
    /// Compute device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto", value_name = "cpu|cuda|cuda:N|auto")]
    pub device: DeviceSpec,
    /// Compute dtype: f32, bf16 or f16 (default: the checkpoint's dtype).
    #[arg(long, value_name = "f32|bf16|f16")]
    pub dtype: Option<DType>,
    /// Where the per-layer split lives (default: next to the checkpoint); implies a split.
    #[arg(long)]
    pub split_dir: Option<PathBuf>,
    /// Layers read ahead of the one computing (at most the number of layers).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub prefetch: u32,
    /// Read streamed layers with O_DIRECT, bypassing the page cache (models larger than RAM).
    #[arg(long)]
    pub direct_io: bool,
    /// Checksum every file of the split before running, not only those changed since they were
    /// last verified (reads the whole model once).
    #[arg(long)]
    pub verify_split: bool,
    /// Hugging Face token for gated or private repos (else HF_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Delete the original weights once the split is verified.
    #[arg(long)]
    pub delete_original: bool,
    /// Memory for resident layers, KV cache and activations on the compute device (host RAM on
    /// CPU), e.g. 4GiB; default: half of the free memory.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub device_memory_budget: Option<ByteSize>,
    /// Keep exactly the first N decoder layers resident (0 streams every layer); overrides the
    /// budget.
    #[arg(long, value_name = "N")]
    pub resident_layers: Option<usize>,
    /// Stream block-wise compressed layers: 4bit (NF4) or 8bit (its own split directory).
    #[arg(long, value_name = "4bit|8bit")]
    pub compression: Option<Compression>,
    /// With --compression, compress the embedding and LM head too.
    #[arg(long, requires = "compression")]
    pub compress_embeddings: bool,
    /// Never split: stream straight from the checkpoint's own weight files, nothing written
    /// anywhere (the default unless compression, --split-dir, --delete-original or
    /// --verify-split needs a split, or one already exists).
    #[arg(long, conflicts_with_all = ["compression", "delete_original", "split_dir", "verify_split"])]
    pub no_split: bool,
    /// Stream from a per-layer split (made on first use, next to the checkpoint or in
    /// --split-dir) even where streaming in place would do.
    #[arg(long, conflicts_with = "no_split")]
    pub split: bool,
    /// Intra-op threads of the CPU kernels: a count, or auto (libtorch's default count, the
    /// cores or OMP_NUM_THREADS, and fewer while other processes keep cores busy).
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub threads: rabbitllm::Threads,
    /// Routed experts of streamed sparse layers kept in memory between tokens, least recently
    /// used dropped first: a size (0 turns it off), or auto (what the memory budget leaves).
    #[arg(long, default_value = "auto", value_name = "SIZE|auto")]
    pub expert_cache: rabbitllm::ExpertCacheSize,
    /// Read streamed sparse layers whole, as dense layers are, instead of only the experts each
    /// token routes to (for comparisons).
    #[arg(long, conflicts_with = "expert_guess")]
    pub whole_layers: bool,
    /// Guess each streamed sparse layer's experts from the layer before's input (the routers
    /// kept resident) and start reading them then, so the disk works while layers compute
    /// (through the page cache: not with --direct-io).
    #[arg(long, conflicts_with = "direct_io")]
    pub expert_guess: bool,
}

impl ModelArgs {
    /// Loads the model, reporting split progress on stderr unless quiet.
    pub fn load(&self, quiet: bool) -> Result<(Model, f64)> {
        self.load_for(quiet, 1, 4096, None)
    }

    /// [`ModelArgs::load`] with the KV cache and activations of `batch` sequences of `context`
    /// positions reserved in the residency plan (activations for `chunk` prompt positions per
    /// row, with chunked prefill).
    pub fn load_for(
        &self,
        quiet: bool,
        batch: usize,
        context: usize,
        chunk: Option<usize>,
    ) -> Result<(Model, f64)> {
        let mut opts = LoadOptions::default()
            .plan_for(batch, context)
            .plan_prefill_chunk(chunk)
            .device(self.device)
            .prefetch_depth(self.prefetch as usize)
            .direct_io(self.direct_io)
            .verify_split(self.verify_split)
            .delete_original(self.delete_original)
            .no_split(self.no_split)
            .threads(self.threads)
            .expert_cache(self.expert_cache)
            .expert_streaming(!self.whole_layers)
            .expert_guess(self.expert_guess);
        if self.split {
            opts = opts.split_policy(rabbitllm::SplitPolicy::Always);
        }
        if let Some(d) = self.dtype {
            opts = opts.dtype(d);
        }
        if let Some(d) = &self.split_dir {
            opts = opts.split_dir(d);
        }
        if let Some(t) = &self.token {
            opts = opts.token(t);
        }
        if let Some(r) = &self.revision {
            opts = opts.revision(r);
        }
        if let Some(b) = self.device_memory_budget {
            opts = opts.device_memory_budget(b.0);
        }
        if let Some(n) = self.resident_layers {
            opts = opts.resident_layers(n);
        }
        if let Some(c) = self.compression {
            opts = opts
                .compression(Some(c))
                .compress_embeddings(self.compress_embeddings);
        }
        opts.hub.progress = show_progress(quiet);
        let start = Instant::now();
        let mut split_bar: Option<indicatif::ProgressBar> = None;
        let mut model =
            AutoModel::from_pretrained_with_progress(&self.model, opts, &mut |e| match e {
                // Always said once: splitting a big model takes a while and must not look like a hang.
                LoadEvent::Split(SplitEvent::Planned {
                    units,
                    bytes,
                    already_done,
                }) if !quiet => {
                    note!(
                        "splitting {} into {units} layer files ({})...",
                        self.model,
                        human_bytes(*bytes)
                    );
                    if show_progress(quiet) {
                        let pb = bar((*units - *already_done) as u64, "split");
                        split_bar = Some(pb);
                    }
                }
                LoadEvent::Split(SplitEvent::UnitDone { .. }) => {
                    if let Some(pb) = &split_bar {
                        pb.inc(1);
                    }
                }
                LoadEvent::InPlace { reason } if !quiet => {
                    note!("{reason}");
                }
                LoadEvent::Planned(p) if !quiet => {
                    if let Some(pb) = split_bar.take() {
                        pb.finish_and_clear();
                    }
                    note!("{}", plan_line(p));
                }
                LoadEvent::Opened { device, dtype } if !quiet => {
                    note!("model on {device} ({dtype})");
                }
                _ => {}
            })
            .with_context(|| format!("loading {}", self.model))?;
        if !quiet {
            // What the family does not run of this checkpoint (e.g. a vision tower).
            for n in &model.engine.spec().notes {
                note!("note: {n}");
            }
        }
        if show_progress(quiet) {
            // A bar across the layers of a prefill sweep (long prompts take a while per layer).
            let mut pb: Option<indicatif::ProgressBar> = None;
            model.engine.on_prefill_layer = Some(Box::new(move |done, total| {
                let b = pb.get_or_insert_with(|| bar(total as u64, "prefill"));
                b.set_position(done as u64);
                if done == total {
                    b.finish_and_clear();
                    pb = None;
                }
            }));
        }
        Ok((model, start.elapsed().as_secs_f64()))
    }
}
