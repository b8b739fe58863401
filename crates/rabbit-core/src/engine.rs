//! The layer-streaming executor: embedding → decoder layers (streamed from the split, prefetched
//! by [`LayerReader`]) → final norm → LM head, for a whole batch per sweep.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rabbit_models::{names, ModelSpec};
use rabbit_split::integrity;
use rabbit_split::layout::UnitKind;
use rabbit_split::manifest::{Manifest, UnitEntry};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::decoder::{layer_forward, rms_norm, AttnContext};
use crate::device::DType;
use crate::error::{CoreError, Result};
use crate::head::MappedMatrix;
use crate::kv::KvCache;
use crate::plan::{make_plan, MemoryBudget, Plan, PlanInputs};
use crate::reader::{LayerReader, ReadMode};
use crate::rope::RopeTables;
use crate::weights::{kind_of, validate_split, DequantBuffers, LayerWeights, UnitTensors};

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
    /// Time in the decoder layers.
    pub compute_s: f64,
    /// Time in embedding, final norm and LM head.
    pub head_s: f64,
    /// The same figures per decoder layer.
    pub layers: Vec<LayerProfile>,
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

/// One forward's inputs: a left-padded batch.
pub struct StepInput {
    /// Token ids `[B, T]`.
    pub ids: Tensor,
    /// Position of each token `[B, T]` (pads get 0).
    pub positions: Tensor,
    /// Largest position in `positions`.
    pub max_position: i64,
    /// Left-padding slots per row `[B]`.
    pub pads: Tensor,
    /// Whether any row has padding.
    pub any_pad: bool,
    /// Cache slot of the first token.
    pub slot: i64,
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
    split_dir: PathBuf,
    device: Device,
    kind: Kind,
    embed: HeadMatrix,
    norm: Tensor,
    lm_head: HeadMatrix,
    layers: Vec<UnitEntry>,
    /// Per layer: the weights when the plan keeps it resident.
    resident: Vec<Option<LayerWeights>>,
    /// Per layer: its slot in the reader's cycle when streamed.
    stream_slot: Vec<Option<usize>>,
    reader: Option<LayerReader>,
    read_mode: ReadMode,
    /// Where streamed compressed layers are dequantized on the CPU (reused every layer).
    dequant_buffers: DequantBuffers,
    plan: Plan,
    rope: RopeTables,
    window: Option<usize>,
    resident_bytes: u64,
    staging_bytes: u64,
    /// Stage timings since the engine opened (or since [`Engine::reset_profile`]).
    pub profile: Profile,
    /// Called after each decoder layer of a multi-token sweep (a prefill) with
    /// `(layers done, layers total)`: for progress bars on long prompts.
    pub on_prefill_layer: Option<Box<dyn FnMut(usize, usize)>>,
}

/// Loads a unit that stays resident, tensor by tensor straight into tensor storage (no
/// whole-unit staging buffer, so loading a 2 GB embedding needs 2 GB, not 4).
fn read_resident(dir: &Path, entry: &UnitEntry, device: Device, kind: Kind) -> Result<UnitTensors> {
    let path = dir.join(&entry.file);
    let file = rabbit_split::fsutil::open_regular(&path)?;
    let mut tensors = std::collections::BTreeMap::new();
    for t in &entry.tensors {
        let stored = kind_of(t.dtype).ok_or_else(|| CoreError::BadTensor {
            file: path.clone(),
            tensor: t.name.clone(),
            reason: format!("dtype {} cannot hold weights", t.dtype.name()),
        })?;
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let host = Tensor::f_empty(shape.as_slice(), (stored, Device::Cpu))?;
        let numel: i64 = shape.iter().product();
        if (numel as u64) * (t.dtype.size_bytes() as u64) != t.len {
            return Err(CoreError::BadTensor {
                file: path.clone(),
                tensor: t.name.clone(),
                reason: format!("{} bytes for shape {:?}", t.len, t.shape),
            });
        }
        // SAFETY: `host` is a fresh contiguous CPU tensor of exactly `t.len` bytes.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, t.len as usize) };
        file.read_exact_at(dst, entry.data_offset + t.offset)
            .map_err(|e| CoreError::io(&path, e))?;
        tensors.insert(t.name.clone(), host.f_to_device(device)?);
    }
    UnitTensors::assemble(entry, tensors, kind)
}

impl Engine {
    /// Opens a split directory: validates it against the spec, loads the embedding, final norm
    /// and LM head, and starts the layer reader.
    pub fn open(split_dir: &Path, spec: ModelSpec, opts: &EngineOptions) -> Result<Engine> {
        let manifest = Manifest::load(split_dir)?;
        validate_split(&spec, &manifest, split_dir)?;
        // Never compute with a damaged split: headers always, checksums of changed files (or of
        // all with verify_split), before any unit is read.
        let checksums = if opts.verify_split {
            integrity::Checksums::All
        } else {
            integrity::Checksums::Changed
        };
        let report = integrity::check(split_dir, &manifest, checksums).into_result(split_dir)?;
        if report.files_hashed > 0 {
            tracing::info!(
                files = report.files_hashed,
                bytes = report.bytes_hashed,
                "split files verified"
            );
        }
        if let Some(e) = &report.record_error {
            tracing::warn!(
                "cannot record the verified split files (they will be hashed again): {e}"
            );
        }
        let kind = opts.dtype.kind();
        let device = opts.device;
        let unit = |k: UnitKind| {
            manifest.unit(k).ok_or_else(|| {
                CoreError::InvalidInput(format!("{}: split has no {k:?} unit", split_dir.display()))
            })
        };
        let embed_entry = unit(UnitKind::Embedding)?;
        let norm_entry = unit(UnitKind::FinalNorm)?;
        let lm_head_entry = if spec.tie_word_embeddings {
            None
        } else {
            Some(unit(UnitKind::LmHead)?)
        };
        let layers: Vec<UnitEntry> = manifest.layers().cloned().collect();
        let elem = opts.dtype.size() as u64;
        // Bytes a unit takes once on the device in the compute dtype (quantized tensors are kept
        // dequantized when resident).
        let compute_bytes = |u: &UnitEntry| -> u64 {
            let quant_parts: Vec<&str> = u
                .quantized
                .iter()
                .flat_map(|q| [q.codes.as_str(), q.scales.as_str()])
                .collect();
            let plain: u64 = u
                .tensors
                .iter()
                .filter(|t| !quant_parts.contains(&t.name.as_str()))
                .map(|t| t.shape.iter().product::<usize>() as u64 * elem)
                .sum();
            let dequantized: u64 = u
                .quantized
                .iter()
                .map(|q| q.shape.iter().product::<usize>() as u64 * elem)
                .sum();
            plain + dequantized
        };
        let context = opts.plan_context.min(spec.max_position_embeddings).max(1);
        let batch = opts.plan_batch.max(1);
        // A compressed embedding/LM head cannot be used from the file row by row: it stays put.
        let movable = |u: &UnitEntry| {
            if u.quantized.is_empty() {
                compute_bytes(u)
            } else {
                0
            }
        };
        let inputs = PlanInputs {
            layer_bytes: layers.iter().map(compute_bytes).collect(),
            head_bytes: [UnitKind::Embedding, UnitKind::FinalNorm, UnitKind::LmHead]
                .iter()
                .filter_map(|k| manifest.unit(*k))
                .map(compute_bytes)
                .sum(),
            embed_bytes: movable(embed_entry),
            lm_head_bytes: lm_head_entry.map_or(0, movable),
            tied: spec.tie_word_embeddings,
            kv_bytes: KvCache::bytes(
                spec.num_layers,
                batch,
                spec.num_kv_heads,
                context,
                spec.head_dim,
                elem as usize,
            ),
            activation_bytes: (batch
                * context
                * (4 * spec.hidden_size + 2 * spec.intermediate_size))
                as u64
                * elem
                + (batch * spec.vocab_size * 4) as u64,
            prefetch_depth: opts.prefetch_depth,
            context,
        };
        let plan = make_plan(&inputs, opts.budget)?;

        let norm = read_resident(split_dir, norm_entry, device, kind)?.take(names::FINAL_NORM)?;
        let mut resident_bytes = norm_entry.data_len;
        let embed = if plan.embedding_on_host {
            HeadMatrix::Mapped(MappedMatrix::open(split_dir, embed_entry, names::EMBED)?, 0)
        } else {
            resident_bytes += embed_entry.data_len;
            HeadMatrix::Resident(
                read_resident(split_dir, embed_entry, device, kind)?.take(names::EMBED)?,
            )
        };
        let chunk_rows =
            |m: &MappedMatrix, bytes: u64| (bytes / (m.cols() as u64 * elem).max(1)).max(1) as i64;
        let lm_head = match (lm_head_entry, plan.lm_head_chunk_bytes, &embed) {
            (None, None, HeadMatrix::Resident(t)) => HeadMatrix::Resident(t.shallow_clone()),
            (None, Some(c), HeadMatrix::Mapped(m, _)) => {
                HeadMatrix::Mapped(m.clone(), chunk_rows(m, c))
            }
            (Some(e), None, _) => {
                resident_bytes += e.data_len;
                HeadMatrix::Resident(
                    read_resident(split_dir, e, device, kind)?.take(names::LM_HEAD)?,
                )
            }
            (Some(e), Some(c), _) => {
                let m = MappedMatrix::open(split_dir, e, names::LM_HEAD)?;
                let rows = chunk_rows(&m, c);
                HeadMatrix::Mapped(m, rows)
            }
            _ => {
                return Err(CoreError::InvalidInput(
                    "a tied embedding and LM head must be placed together".into(),
                ))
            }
        };
        let mut resident: Vec<Option<LayerWeights>> = (0..layers.len()).map(|_| None).collect();
        for &i in &plan.resident_layers {
            let tensors = read_resident(split_dir, &layers[i], device, kind)?;
            resident[i] = Some(LayerWeights::from_unit(&spec, i, tensors)?);
        }
        let mut stream_slot = vec![None; layers.len()];
        for (slot, &i) in plan.streamed_layers.iter().enumerate() {
            stream_slot[i] = Some(slot);
        }
        let refs: Vec<&UnitEntry> = plan.streamed_layers.iter().map(|&i| &layers[i]).collect();
        let depth = opts.prefetch_depth.max(1);
        // On CPU the kernels can read the page cache in place; a device needs host bytes to copy.
        let mode = ReadMode::for_device(device, opts.direct_io);
        let reader = if refs.is_empty() {
            None
        } else {
            Some(LayerReader::start(split_dir, &refs, depth, mode)?)
        };
        resident_bytes += plan.resident_layer_bytes;
        let staging_bytes = plan.staging_bytes;
        let windows: Vec<usize> = spec.sliding_windows.iter().flatten().copied().collect();
        let window = windows.first().copied();
        if windows.iter().any(|w| Some(*w) != window) {
            return Err(CoreError::InvalidInput(
                "layers with different sliding-window sizes are not supported".into(),
            ));
        }
        let rope = RopeTables::new(&spec.rope, device)?;
        Ok(Engine {
            spec,
            split_dir: split_dir.to_path_buf(),
            device,
            kind,
            embed,
            norm,
            lm_head,
            layers,
            resident,
            stream_slot,
            reader,
            read_mode: mode,
            dequant_buffers: DequantBuffers::default(),
            plan,
            rope,
            window,
            resident_bytes,
            staging_bytes,
            profile: Profile::default(),
            on_prefill_layer: None,
        })
    }

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

    /// The split directory in use.
    pub fn split_dir(&self) -> &Path {
        &self.split_dir
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
            .map(|&i| self.layers[i].data_len)
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

    /// The layer files' entries, in execution order.
    pub fn layer_units(&self) -> &[UnitEntry] {
        &self.layers
    }

    /// Drop each streamed layer from the page cache after use, so every sweep reads from the
    /// disk as it would for a model larger than RAM (for cold-storage benchmarks).
    pub fn set_evict_after_use(&mut self, on: bool) {
        if let Some(r) = self.reader.as_mut() {
            r.set_evict(on);
        }
    }

    /// Clears the stage timings.
    pub fn reset_profile(&mut self) {
        self.profile = Profile::default();
    }

    /// Allocates a KV cache for `batch` rows of `capacity` slots.
    pub fn new_kv(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.spec.num_layers,
            batch as i64,
            self.spec.num_kv_heads as i64,
            capacity as i64,
            self.spec.head_dim as i64,
            self.kind,
            self.device,
        )
    }

    /// Attention mask `[B, 1, T, S]` (true = attend): causal, left padding excluded (a pad query
    /// attends to itself so no row is empty), optional sliding window.
    fn mask(&self, input: &StepInput, t: i64, window: Option<usize>) -> Result<Tensor> {
        let s = input.slot + t;
        let opts = (Kind::Int64, self.device);
        let q = Tensor::f_arange_start(input.slot, s, opts)?.f_view([t, 1])?;
        let k = Tensor::f_arange_start(0, s, opts)?.f_view([1, s])?;
        let causal = k.f_le_tensor(&q)?;
        let diag = k.f_eq_tensor(&q)?;
        let not_pad = k
            .f_unsqueeze(0)?
            .f_ge_tensor(&input.pads.f_view([-1, 1, 1])?)?;
        let mut allowed = causal
            .f_unsqueeze(0)?
            .f_logical_and(&not_pad.f_logical_or(&diag.f_unsqueeze(0)?)?)?;
        if let Some(w) = window {
            let inside = q.f_sub(&k)?.f_lt(w as i64)?;
            allowed = allowed.f_logical_and(&inside.f_unsqueeze(0)?)?;
        }
        Ok(allowed.f_unsqueeze(1)?)
    }

    /// One sweep over the whole model for a batch. Returns float32 logits: `[B, V]` for the last
    /// position, or `[B, T, V]` for every position when `all_positions`.
    pub fn forward(
        &mut self,
        input: &StepInput,
        kv: &mut KvCache,
        all_positions: bool,
    ) -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        let size = input.ids.size();
        let (b, t) = (size[0], size[1]);
        let head_start = Instant::now();
        let mut h = match &self.embed {
            HeadMatrix::Resident(w) => Tensor::f_embedding(w, &input.ids, -1, false, false)?,
            HeadMatrix::Mapped(m, _) => m.embed(&input.ids, self.device, self.kind)?,
        };
        let (cos, sin) = self
            .rope
            .cos_sin(&input.positions, input.max_position, self.kind)?;
        let needs_full = input.any_pad || (t > 1 && input.slot > 0);
        let full_mask = if needs_full {
            Some(self.mask(input, t, None)?)
        } else {
            None
        };
        // The window only cuts once a query is `w` or more slots past the first key; before
        // that a windowed layer needs exactly what a full one does (decoder falls back to it).
        let window_mask = match self.window {
            Some(w) if input.slot + t > w as i64 => Some(self.mask(input, t, Some(w))?),
            _ => None,
        };
        let ctx = AttnContext {
            cos,
            sin,
            slot: input.slot,
            full_mask,
            window_mask,
            causal: input.slot == 0 && t > 1,
        };
        let _ = b;
        let mut head_time = head_start.elapsed();

        for i in 0..self.layers.len() {
            let windowed = self.spec.sliding_windows[i].is_some();
            if self.profile.layers.len() != self.layers.len() {
                self.profile.layers = self
                    .resident
                    .iter()
                    .map(|r| LayerProfile {
                        resident: r.is_some(),
                        ..Default::default()
                    })
                    .collect();
            }
            if let Some(w) = &self.resident[i] {
                let compute = Instant::now();
                h = layer_forward(&self.spec, w, &h, &mut kv.layers[i], &ctx, windowed)?;
                let dt = compute.elapsed().as_secs_f64();
                self.profile.compute_s += dt;
                self.profile.layers[i].compute_s += dt;
                if let (true, Some(hook)) = (t > 1, self.on_prefill_layer.as_mut()) {
                    hook(i + 1, self.layers.len());
                }
                continue;
            }
            let (Some(reader), Some(slot)) = (self.reader.as_mut(), self.stream_slot[i]) else {
                return Err(CoreError::Reader(format!(
                    "layer {i} is neither resident nor streamed"
                )));
            };
            let (unit, wait) = reader.next(slot)?;
            let n = unit.bytes.as_slice().len() as u64;
            self.profile.read_wait_s += wait.as_secs_f64();
            self.profile.read_s += unit.read_time.as_secs_f64();
            self.profile.bytes_streamed += n;
            self.profile.layers_streamed += 1;
            let lp = &mut self.profile.layers[i];
            lp.read_wait_s += wait.as_secs_f64();
            lp.read_s += unit.read_time.as_secs_f64();
            lp.bytes += n;
            let result = (|| {
                let stage = Instant::now();
                let tensors = UnitTensors::from_region_into(
                    &self.layers[i],
                    unit.bytes.as_slice(),
                    self.device,
                    self.kind,
                    Some(&mut self.dequant_buffers),
                )?;
                let dequant = tensors.dequant_s;
                let w = LayerWeights::from_unit(&self.spec, i, tensors)?;
                let staged = stage.elapsed().as_secs_f64() - dequant;
                self.profile.dequant_s += dequant;
                self.profile.layers[i].dequant_s += dequant;
                self.profile.stage_s += staged;
                self.profile.layers[i].stage_s += staged;
                let compute = Instant::now();
                let out = layer_forward(&self.spec, &w, &h, &mut kv.layers[i], &ctx, windowed);
                let dt = compute.elapsed().as_secs_f64();
                self.profile.compute_s += dt;
                self.profile.layers[i].compute_s += dt;
                // The layer is computed: nothing references its weights any more.
                self.dequant_buffers.reclaim(w.into_tensors());
                out
            })();
            // The weights (which may alias the bytes) are gone; the bytes can be recycled.
            if let Some(reader) = self.reader.as_ref() {
                reader.recycle(slot, unit.bytes);
            }
            h = result?;
            if let (true, Some(hook)) = (t > 1, self.on_prefill_layer.as_mut()) {
                hook(i + 1, self.layers.len());
            }
        }

        let head_start = Instant::now();
        if !all_positions {
            h = h.f_narrow(1, t - 1, 1)?;
        }
        let h = rms_norm(&h, &self.norm, self.spec.rms_norm_eps)?;
        let logits = match &self.lm_head {
            HeadMatrix::Resident(w) => h.f_linear::<Tensor>(w, None)?,
            HeadMatrix::Mapped(m, rows) => m.linear_chunked(&h, *rows, self.device, self.kind)?,
        }
        .f_to_kind(Kind::Float)?;
        let logits = if all_positions {
            logits
        } else {
            logits.f_squeeze_dim(1)?
        };
        head_time += head_start.elapsed();
        self.profile.head_s += head_time.as_secs_f64();
        Ok(logits)
    }
}
