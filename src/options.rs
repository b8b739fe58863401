//! [`LoadOptions`]: how [`crate::AutoModel::from_pretrained`] finds, prepares and opens a
//! model, as a typed builder.

use std::path::PathBuf;

use rabbit_core::device::{DType, DeviceSpec};
use rabbit_core::plan::MemoryBudget;
use rabbit_core::threads::Threads;
use rabbit_core::ExpertCacheSize;
use rabbit_split::Compression;

use crate::hub::HubOptions;
use crate::storage::SplitPolicy;

/// Options of [`crate::AutoModel::from_pretrained`], as a typed builder.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute device (default: auto).
    pub device: DeviceSpec,
    /// Compute dtype (default: the checkpoint's dtype, f32 if unknown).
    pub dtype: Option<DType>,
    /// Where the per-layer split lives (default: next to a local checkpoint, or under the
    /// rabbitllm cache for hub models).
    pub split_dir: Option<PathBuf>,
    /// Layers read ahead while one computes (default 2; 0 is treated as 1).
    pub prefetch_depth: usize,
    /// Read streamed layers with `O_DIRECT`, bypassing the page cache (for models larger than
    /// RAM; buffered reads where the file system refuses it).
    pub direct_io: bool,
    /// Checksum every file of the split when opening it, not only those changed since they were
    /// last verified (a full read of the model; catches damage that left a file's size and
    /// times unchanged).
    pub verify_split: bool,
    /// Hub access.
    pub hub: HubOptions,
    /// Delete the original weight files once the split is verified complete.
    pub delete_original: bool,
    /// Memory the residency planner may fill with resident layers.
    pub budget: MemoryBudget,
    /// Block-wise compression of the decoder layers' linear weights (its own split directory).
    pub compression: Option<Compression>,
    /// Also compress the embedding and LM head.
    pub compress_embeddings: bool,
    /// Whether to split the checkpoint or stream straight from its own weight files (default:
    /// in place unless a split pays, see [`SplitPolicy`]). A split that would not fit on the
    /// disk falls back to streaming in place unless it is needed (compression,
    /// --delete-original, --verify-split).
    pub split: SplitPolicy,
    /// Sequences at once the planner reserves KV cache and activations for (default 1).
    pub plan_batch: usize,
    /// Positions per sequence (prompt + new tokens) reserved for (default 4096, at most the
    /// model's context).
    pub plan_context: usize,
    /// Prompt positions per row and sweep when prefill is chunked (`None`: a whole context per
    /// row); activations are reserved for `plan_batch` rows of this many.
    pub plan_prefill_chunk: Option<usize>,
    /// Intra-op threads of the CPU kernels (process-wide): [`Threads::Auto`] (the default) uses
    /// libtorch's count on a quiet machine and fewer while other processes keep cores busy.
    pub threads: Threads,
    /// Bytes of routed experts kept between sweeps when sparse layers stream
    /// ([`ExpertCacheSize::Auto`]: what the memory budget leaves).
    pub expert_cache: ExpertCacheSize,
    /// Streamed sparse layers read only the experts each sweep routes to (default); `false`
    /// reads them whole, like dense layers (for comparisons).
    pub expert_streaming: bool,
    /// Guess each streamed sparse layer's experts one layer early and start reading them then.
    pub expert_guess: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: DeviceSpec::Auto,
            dtype: None,
            split_dir: None,
            prefetch_depth: 2,
            direct_io: false,
            verify_split: false,
            hub: HubOptions::default(),
            delete_original: false,
            budget: MemoryBudget::default(),
            compression: None,
            compress_embeddings: false,
            split: SplitPolicy::Auto,
            plan_batch: 1,
            plan_context: 4096,
            plan_prefill_chunk: None,
            threads: Threads::Auto,
            expert_cache: ExpertCacheSize::Auto,
            expert_streaming: true,
            expert_guess: false,
        }
    }
}

impl LoadOptions {
    /// Compute device.
    pub fn device(mut self, d: DeviceSpec) -> Self {
        self.device = d;
        self
    }
    /// Compute dtype.
    pub fn dtype(mut self, d: DType) -> Self {
        self.dtype = Some(d);
        self
    }
    /// Split directory.
    pub fn split_dir(mut self, p: impl Into<PathBuf>) -> Self {
        self.split_dir = Some(p.into());
        self
    }
    /// Read-ahead depth.
    pub fn prefetch_depth(mut self, n: usize) -> Self {
        self.prefetch_depth = n;
        self
    }
    /// Read streamed layers with `O_DIRECT`.
    pub fn direct_io(mut self, on: bool) -> Self {
        self.direct_io = on;
        self
    }
    /// Checksum every split file at open.
    pub fn verify_split(mut self, on: bool) -> Self {
        self.verify_split = on;
        self
    }
    /// Hub token.
    pub fn token(mut self, t: impl Into<String>) -> Self {
        self.hub.token = Some(t.into());
        self
    }
    /// Hub revision.
    pub fn revision(mut self, r: impl Into<String>) -> Self {
        self.hub.revision = Some(r.into());
        self
    }
    /// Never use the network.
    pub fn offline(mut self, yes: bool) -> Self {
        self.hub.offline = yes;
        self
    }
    /// Compute-device memory for resident weights, KV cache and activations (host RAM on CPU);
    /// 0 streams every layer.
    pub fn device_memory_budget(mut self, bytes: u64) -> Self {
        self.budget.device = Some(bytes);
        self
    }
    /// Reserve KV cache and activations for `batch` sequences of `context` positions each
    /// (a server's `--max-batch` and context): resident layers get only what is left.
    pub fn plan_for(mut self, batch: usize, context: usize) -> Self {
        self.plan_batch = batch;
        self.plan_context = context;
        self
    }

    /// Sweeps carry at most `chunk` prompt positions per row (`--prefill-chunk`), so activations
    /// are reserved for that many per row rather than whole contexts.
    pub fn plan_prefill_chunk(mut self, chunk: Option<usize>) -> Self {
        self.plan_prefill_chunk = chunk;
        self
    }

    /// Intra-op threads of the CPU kernels (see [`LoadOptions::threads`]).
    pub fn threads(mut self, t: Threads) -> Self {
        self.threads = t;
        self
    }

    /// The expert cache's size (see [`LoadOptions::expert_cache`]).
    pub fn expert_cache(mut self, size: ExpertCacheSize) -> Self {
        self.expert_cache = size;
        self
    }

    /// Guess experts a layer early (see [`LoadOptions::expert_guess`]).
    pub fn expert_guess(mut self, on: bool) -> Self {
        self.expert_guess = on;
        self
    }

    /// Read streamed sparse layers by routed expert (default) or whole (see
    /// [`LoadOptions::expert_streaming`]).
    pub fn expert_streaming(mut self, on: bool) -> Self {
        self.expert_streaming = on;
        self
    }

    /// Keep exactly the first `n` decoder layers resident (0: stream every layer), instead of
    /// planning from the budget.
    pub fn resident_layers(mut self, n: usize) -> Self {
        self.budget.resident_layers = Some(n);
        self
    }
    /// Stream 4-bit (NF4) or 8-bit block-wise compressed layers, dequantized on the device.
    pub fn compression(mut self, c: Option<Compression>) -> Self {
        self.compression = c;
        self
    }
    /// Compress the embedding and LM head too (with [`LoadOptions::compression`]).
    pub fn compress_embeddings(mut self, yes: bool) -> Self {
        self.compress_embeddings = yes;
        self
    }
    /// Delete original weights after a verified split.
    pub fn delete_original(mut self, yes: bool) -> Self {
        self.delete_original = yes;
        self
    }
    /// Never split: stream from the checkpoint's own files (`yes`), or back to the default
    /// policy.
    pub fn no_split(mut self, yes: bool) -> Self {
        self.split = if yes {
            SplitPolicy::Never
        } else {
            SplitPolicy::Auto
        };
        self
    }
    /// When to split (see [`SplitPolicy`]).
    pub fn split_policy(mut self, p: SplitPolicy) -> Self {
        self.split = p;
        self
    }
}
