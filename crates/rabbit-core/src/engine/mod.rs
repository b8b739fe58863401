//! The layer-streaming executor: embedding → decoder layers (streamed from the split, prefetched
//! by [`LayerReader`]) → final norm → LM head, for a whole batch per sweep.
//!
//! This file holds the engine's state and accessors; `open` validates a split and loads what
//! stays resident, `forward` runs one sweep (masks, layers, head).

mod experts;
mod forward;
mod input;
mod open;
pub mod parts;
mod units;

pub use experts::ExpertCacheSize;

pub(crate) use input::Layout;
pub use input::{Logits, RowInput, StepInput};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rabbit_models::ModelSpec;
use rabbit_split::layout::RowOrder;
use rabbit_split::manifest::UnitEntry;
use rabbit_split::UnitRegion;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::decoder::NormWeights;
use crate::device::DType;
use crate::error::{CoreError, Result};
use crate::head::MappedMatrix;
use crate::kv::KvCache;
use crate::plan::{MemoryBudget, Plan};
use crate::reader::{LayerReader, ReadMode};
use crate::rope::RopeTables;
use crate::sampling::SamplingParams;
use crate::threads::Threads;
use crate::weights::{DequantBuffers, LayerWeights};
use rabbit_models::RopeScaling;

/// How to run a split model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Compute device.
    pub device: Device,
    /// Compute dtype.
    pub dtype: DType,
    /// Layers read ahead of the one computing.
    pub prefetch_depth: usize,
    /// Read streamed layers with `O_DIRECT` into recycled buffers (bypassing the page cache).
    pub direct_io: bool,
    /// Checksum every unit file at open, not only those changed since their last verification
    /// (see [`rabbit_split::integrity`]).
    pub verify_split: bool,
    /// Memory the planner may fill with resident layers.
    pub budget: MemoryBudget,
    /// Batch size the KV/activation reservation is planned for.
    pub plan_batch: usize,
    /// Context length (prompt + new tokens) the KV/activation reservation is planned for
    /// (capped at max_position_embeddings).
    pub plan_context: usize,
    /// Prompt positions per row and sweep when prefill is chunked (`None`: a whole context per
    /// row at once). Activations are reserved for `plan_batch` rows of this many.
    pub plan_prefill_chunk: Option<usize>,
    /// Intra-op threads of the CPU kernels (process-wide; see [`crate::threads`]).
    pub threads: Threads,
    /// Bytes of routed experts kept between sweeps (streamed sparse layers).
    pub expert_cache: ExpertCacheSize,
    /// Streamed sparse layers read only their routed experts (after routing); `false` reads
    /// them whole, as dense layers are (for comparisons).
    pub expert_streaming: bool,
    /// Guess each streamed sparse layer's experts from the layer before's input (its router
    /// kept resident) and start reading them then.
    pub expert_guess: bool,
}

impl EngineOptions {
    /// CPU/f32 defaults: read 2 layers ahead, budget from free memory, planned for batch 1 and a
    /// 4096-token context.
    pub fn new(device: Device, dtype: DType) -> EngineOptions {
        EngineOptions {
            device,
            dtype,
            prefetch_depth: 2,
            direct_io: false,
            verify_split: false,
            budget: MemoryBudget::default(),
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

/// Accumulated time per pipeline stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Profile {
    /// Layers streamed.
    pub layers_streamed: u64,
    /// Bytes read from layer files.
    pub bytes_streamed: u64,
    /// Time the compute thread waited for a layer to arrive.
    pub read_wait_s: f64,
    /// Time the reader spent in read calls (overlaps compute).
    pub read_s: f64,
    /// Time turning bytes into device tensors (views, dtype conversion, host→device copy).
    pub stage_s: f64,
    /// Time dequantizing compressed layers (part of staging, reported apart).
    pub dequant_s: f64,
    /// Compressed weights of streamed layers applied as stored, without dequantizing (sweeps
    /// of a few positions; see [`crate::qgemv`]), counted once per layer and sweep.
    pub packed_weights: u64,
    /// Time in the decoder layers.
    pub compute_s: f64,
    /// Time in embedding, final norm and LM head.
    pub head_s: f64,
    /// Routed experts of streamed layers used (each layer's distinct experts per sweep), cache
    /// hits included.
    pub expert_loads: u64,
    /// Of those, found in the expert cache.
    pub expert_hits: u64,
    /// Bytes read for routed experts (part of `bytes_streamed`).
    pub expert_bytes: u64,
    /// Experts guessed ahead of their layer (read early; `--expert-guess`), and of those, the
    /// ones the layer's router then chose.
    pub expert_guesses: u64,
    /// See `expert_guesses`.
    pub expert_guess_hits: u64,
    /// Bytes of guessed experts asked of the disk ahead (not cached then; read whether the
    /// guess was right or not, not counted in `bytes_streamed`).
    pub expert_guess_bytes: u64,
    /// Bytes the sweeps' routing implies for the streamed layers: their dense parts and every
    /// routed expert, cached or not.
    pub active_bytes: u64,
    /// Decode sweeps (one position per row): their count, and the figures above summed over
    /// them alone (a prefill routes its whole prompt, which says nothing of a decode step).
    pub decode: DecodeCounts,
    /// The same figures per decoder layer.
    pub layers: Vec<LayerProfile>,
}

/// Byte and expert counts of decode sweeps alone.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DecodeCounts {
    /// Decode sweeps.
    pub sweeps: u64,
    /// Bytes read.
    pub bytes_streamed: u64,
    /// Bytes the routing implied.
    pub active_bytes: u64,
    /// Routed experts used.
    pub expert_loads: u64,
    /// Of those, expert-cache hits.
    pub expert_hits: u64,
}

impl Profile {
    /// The counts [`DecodeCounts`] sums, now.
    pub(crate) fn counts(&self) -> DecodeCounts {
        DecodeCounts {
            sweeps: 0,
            bytes_streamed: self.bytes_streamed,
            active_bytes: self.active_bytes,
            expert_loads: self.expert_loads,
            expert_hits: self.expert_hits,
        }
    }

    /// Adds what a decode sweep counted since `before`.
    pub(crate) fn add_decode(&mut self, before: DecodeCounts) {
        let now = self.counts();
        let d = &mut self.decode;
        d.sweeps += 1;
        d.bytes_streamed += now.bytes_streamed - before.bytes_streamed;
        d.active_bytes += now.active_bytes - before.active_bytes;
        d.expert_loads += now.expert_loads - before.expert_loads;
        d.expert_hits += now.expert_hits - before.expert_hits;
    }

    /// Share of routed experts found in the expert cache during decode sweeps.
    pub fn expert_hit_rate(&self) -> Option<f64> {
        let d = &self.decode;
        (d.expert_loads > 0).then(|| d.expert_hits as f64 / d.expert_loads as f64)
    }
}

/// Stage times of one decoder layer, summed over sweeps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerProfile {
    /// Whether the layer is resident (never streamed).
    pub resident: bool,
    /// Bytes read for this layer.
    pub bytes: u64,
    /// Waiting for the reader.
    pub read_wait_s: f64,
    /// Reading (in the reader thread).
    pub read_s: f64,
    /// Bytes → device tensors.
    pub stage_s: f64,
    /// Dequantization.
    pub dequant_s: f64,
    /// Layer compute.
    pub compute_s: f64,
    /// Routed experts used (streamed sparse layers).
    pub expert_loads: u64,
    /// Of those, expert-cache hits.
    pub expert_hits: u64,
}

impl Profile {
    /// The stage that dominated, by total time: `read` (waiting for I/O), `stage`
    /// (transfer/conversion), `compute`, or `head`.
    pub fn bottleneck(&self) -> &'static str {
        let stages = [
            ("read", self.read_wait_s),
            ("stage", self.stage_s),
            ("dequant", self.dequant_s),
            ("compute", self.compute_s),
            ("head", self.head_s),
        ];
        stages
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|s| s.0)
            .unwrap_or("compute")
    }
}

/// A float32 tensor's values on the host, row-major (logits to choose tokens from).
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?,
    )?)
}

/// The embedding or LM head: on the device, or used from the mapped split file (with the LM
/// head's chunk rows).
enum HeadMatrix {
    Resident(Tensor),
    Mapped(Arc<MappedMatrix>, i64),
}

/// A model opened for streamed execution.
pub struct Engine {
    spec: ModelSpec,
    /// The split directory, or the checkpoint directory when streaming in place.
    source_dir: PathBuf,
    /// Streaming from the original weight files (no split).
    in_place: bool,
    /// Where each layer's bytes come from.
    layer_regions: Vec<UnitRegion>,
    /// Tensors whose rows are regrouped after reading (in place only).
    row_orders: Vec<RowOrder>,
    device: Device,
    kind: Kind,
    embed: HeadMatrix,
    norm: NormWeights,
    lm_head: HeadMatrix,
    lm_head_bias: Option<Tensor>,
    /// `spec.embed_scale` as a scalar in the compute dtype, on the device.
    embed_scale: Option<Tensor>,
    layers: Vec<UnitEntry>,
    /// Per layer: the weights when the plan keeps it resident.
    resident: Vec<Option<LayerWeights>>,
    /// Per layer: its slot in the reader's cycle when streamed.
    stream_slot: Vec<Option<usize>>,
    reader: Option<LayerReader>,
    /// The routed experts of streamed sparse layers, read after routing.
    experts: Option<experts::ExpertStreams>,
    read_mode: ReadMode,
    /// Where streamed compressed layers are dequantized on the CPU (reused every layer).
    dequant_buffers: DequantBuffers,
    plan: Plan,
    rope: RopeTables,
    local_rope: Option<RopeTables>,
    window: Option<usize>,
    resident_bytes: u64,
    staging_bytes: u64,
    /// Stage timings since the engine opened (or since [`Engine::reset_profile`]).
    pub profile: Profile,
    /// Called after each decoder layer of a multi-token sweep (a prefill) with
    /// `(layers done, layers total)`: for progress bars on long prompts.
    pub on_prefill_layer: Option<Box<dyn FnMut(usize, usize)>>,
}

impl Engine {
    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Compute device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Compute dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The split directory in use, or the checkpoint directory when streaming in place.
    pub fn source_dir(&self) -> &Path {
        &self.source_dir
    }

    /// Whether the layers stream straight from the checkpoint's weight files (no split).
    pub fn streams_in_place(&self) -> bool {
        self.in_place
    }

    /// Where each layer's bytes come from (one extent per layer for a split).
    pub fn layer_regions(&self) -> &[UnitRegion] {
        &self.layer_regions
    }

    /// Bytes of weights resident on the device (embedding, norm, LM head).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// Bytes of host staging buffers.
    pub fn staging_bytes(&self) -> u64 {
        self.staging_bytes
    }

    /// Bytes streamed per full sweep (the layers the plan does not keep resident).
    pub fn bytes_per_sweep(&self) -> u64 {
        self.plan
            .streamed_layers
            .iter()
            .map(|&i| self.layer_regions[i].bytes_read())
            .sum()
    }

    /// How streamed layers are read.
    pub fn read_mode(&self) -> ReadMode {
        self.read_mode
    }

    /// Where the planner put each part of the model.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The layers' entries, in execution order (tensor offsets are positions in each layer's
    /// region).
    pub fn layer_units(&self) -> &[UnitEntry] {
        &self.layers
    }

    /// Bytes of streamed layers the reader keeps mapped between sweeps (page-cache pages that
    /// count in RSS; see [`crate::reader`]).
    pub fn kept_mapped_bytes(&self) -> u64 {
        self.reader.as_ref().map_or(0, |r| r.kept_mapped_bytes())
    }

    /// Keep streamed layers mapped between sweeps (mapped mode; on by default when the streamed
    /// layers fit in three quarters of the available memory), or map them every sweep.
    pub fn set_keep_mappings(&mut self, on: bool) {
        if let Some(r) = self.reader.as_mut() {
            r.set_keep_mappings(on && self.read_mode == ReadMode::Map);
        }
    }

    /// Drop each streamed layer from the page cache after use, so every sweep reads from the
    /// disk as it would for a model larger than RAM (for cold-storage benchmarks).
    pub fn set_evict_after_use(&mut self, on: bool) {
        if let Some(r) = self.reader.as_mut() {
            r.set_evict(on);
        }
        if let Some(x) = self.experts.as_mut() {
            x.evicting = on;
        }
    }

    /// The expert cache's budget and the bytes it holds now, and the bytes of every streamed
    /// expert (`None` when no layer streams by expert).
    pub fn expert_cache(&self) -> Option<(u64, u64, u64)> {
        self.experts
            .as_ref()
            .map(|x| (x.cache.budget(), x.cache.used(), x.total_bytes()))
    }

    /// Clears the stage timings.
    pub fn reset_profile(&mut self) {
        self.profile = Profile::default();
    }

    /// The model's rotary tables (the local one too, for models with one).
    pub(crate) fn rope_tables(&self) -> Vec<&RopeTables> {
        std::iter::once(&self.rope)
            .chain(self.local_rope.as_ref())
            .collect()
    }

    /// Allocates a KV cache for `batch` rows (sequences) of `capacity` slots.
    pub fn new_kv(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.spec.num_layers,
            batch as i64,
            &self.spec.kv_shape(),
            capacity as i64,
            self.kind,
            self.device,
        )
    }

    /// Checks one sequence against the model's limits before any compute.
    pub fn validate_sequence(
        &self,
        i: usize,
        s: &[u32],
        max_new_tokens: usize,
        sampling: &SamplingParams,
    ) -> Result<()> {
        let spec = self.spec();
        sampling.validate()?;
        if s.is_empty() {
            return Err(CoreError::InvalidInput(format!("sequence {i} is empty")));
        }
        if let Some(&bad) = s.iter().find(|&&t| t as usize >= spec.vocab_size) {
            return Err(CoreError::InvalidInput(format!(
                "sequence {i}: token id {bad} is out of range (vocab_size is {})",
                spec.vocab_size
            )));
        }
        let total = s.len().saturating_add(max_new_tokens);
        if spec.context_limit().is_some_and(|limit| total > limit) {
            return Err(CoreError::ContextTooLong {
                reason: format!(
                    "sequence {i}: {} prompt tokens + {max_new_tokens} new tokens = {total} > max_position_embeddings {}",
                    s.len(),
                    spec.max_position_embeddings
                ),
            });
        }
        Ok(())
    }

    /// The length past which LongRoPE switches to its long factors.
    pub fn longrope_switch(&self) -> Option<usize> {
        match &self.spec().rope.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => Some(*original_max_position_embeddings),
            _ => None,
        }
    }

    /// Whether a row of prompt length `prompt` sees the same RoPE frequencies at lengths `a`
    /// and `b` (every rotary table of the model).
    pub fn rope_uniform(&self, a: usize, b: usize, prompt: usize) -> bool {
        self.rope_tables()
            .iter()
            .all(|r| r.same_frequencies(a, b, prompt))
    }
}
