//! Opening a split: validation against the spec, the integrity check, the residency plan, the
//! resident units and the layer reader.

use std::path::Path;

use rabbit_models::ModelSpec;
use rabbit_split::dtype::Dtype;
use rabbit_split::layout::UnitKind;
use rabbit_split::manifest::{Manifest, UnitEntry};
use rabbit_split::{integrity, InPlace, UnitRegion};
use tch::{Device, Tensor};

use super::experts::{ExpertCache, ExpertCacheSize, ExpertStreams, Guide, LayerParts};
use super::parts::{part_of, Part};
use super::units::{read_guide, Units};
use super::{Engine, EngineOptions, HeadMatrix, Profile};
use crate::decoder::NormWeights;
use crate::error::{CoreError, Result};
use crate::head::MappedMatrix;
use crate::kv::KvCache;
use crate::plan::{make_plan, PlanInputs};
use crate::reader::{LayerReader, PartReader, ReadMode};
use crate::rope::RopeTables;
use crate::validate::validate_split;
use crate::weights::{DequantBuffers, LayerWeights};

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
        let regions: Vec<UnitRegion> = manifest
            .units
            .iter()
            .map(|u| UnitRegion::of_split_unit(split_dir, u))
            .collect();
        let units = Units {
            manifest: &manifest,
            regions: &regions,
            row_orders: &[],
            fp8_block: spec.fp8_block,
            original: false,
            stamps: &[],
        };
        Self::open_units(split_dir, &units, spec, opts)
    }

    /// Opens a checkpoint for streaming straight from its own weight files, no split written
    /// (`--no-split`): the tensors' byte ranges come from the shard headers, adjacent ranges are
    /// read as one, and nothing is written anywhere. The same checks as a split refuse a
    /// checkpoint that does not match its config, by name.
    pub fn open_in_place(
        checkpoint_dir: &Path,
        spec: ModelSpec,
        opts: &EngineOptions,
    ) -> Result<Engine> {
        let plan = rabbit_split::plan_in_place(checkpoint_dir, &spec.layout())?;
        Self::open_planned_in_place(&plan, spec, opts)
    }

    /// [`Engine::open_in_place`] of a checkpoint already planned (the caller wanted its sizes).
    pub fn open_planned_in_place(
        plan: &InPlace,
        spec: ModelSpec,
        opts: &EngineOptions,
    ) -> Result<Engine> {
        validate_split(&spec, &plan.manifest, &plan.dir)?;
        let units = Units {
            manifest: &plan.manifest,
            regions: &plan.regions,
            row_orders: &plan.row_orders,
            fp8_block: spec.fp8_block,
            original: true,
            stamps: &plan.stamps,
        };
        Self::open_units(&plan.dir, &units, spec, opts)
    }

    fn open_units(
        source_dir: &Path,
        units: &Units<'_>,
        spec: ModelSpec,
        opts: &EngineOptions,
    ) -> Result<Engine> {
        let manifest = units.manifest;
        let kind = opts.dtype.kind();
        let device = opts.device;
        // Before any kernel runs: loading (fusing, dequantising) uses the same threads.
        crate::threads::configure(opts.threads);
        let unit = |k: UnitKind| {
            manifest.unit(k).ok_or_else(|| {
                CoreError::InvalidInput(format!("{}: no {k:?} unit", source_dir.display()))
            })
        };
        let embed_entry = unit(UnitKind::Embedding)?;
        let norm_entry = unit(UnitKind::FinalNorm)?;
        let lm_head_entry = if spec.tie_word_embeddings {
            None
        } else {
            Some(unit(UnitKind::LmHead)?)
        };
        let layer_entries: Vec<&UnitEntry> = manifest.layers().collect();
        let layers: Vec<UnitEntry> = layer_entries.iter().map(|u| (*u).clone()).collect();
        let layer_regions: Vec<UnitRegion> = layer_entries
            .iter()
            .map(|u| units.region(u).clone())
            .collect();
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
                .map(|t| {
                    let n = t.shape.iter().product::<usize>() as u64;
                    // MXFP4: two values per block byte; the exponents are not kept.
                    let values = match t.dtype {
                        Dtype::U8 if t.name.contains("_blocks") => 2 * n,
                        Dtype::U8 if t.name.contains("_scales") => 0,
                        _ => n,
                    };
                    values * elem
                })
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
        // Sparse layers, when their experts may stream on their own: each cut into its dense
        // part and one part per routed expert (used for the layers the plan streams).
        let mut parts: Vec<Option<(Part, Vec<Part>)>> = (0..layers.len()).map(|_| None).collect();
        if opts.expert_streaming {
            for (i, slot) in parts.iter_mut().enumerate() {
                let Some(moe) = spec.moe.as_ref().filter(|_| spec.is_sparse(i)) else {
                    continue;
                };
                let names: Vec<Vec<String>> = (0..moe.num_experts)
                    .map(|e| spec.expert_tensors(i, e))
                    .collect();
                let all: std::collections::HashSet<&str> =
                    names.iter().flatten().map(String::as_str).collect();
                let (entry, region) = (&layers[i], &layer_regions[i]);
                let dense = part_of(entry, region, &|n| !all.contains(n))?;
                let mut experts = Vec::with_capacity(names.len());
                for e in &names {
                    experts.push(part_of(entry, region, &|n| e.iter().any(|x| x == n))?);
                }
                *slot = Some((dense, experts));
            }
        }
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
                &spec.kv_shape(),
                context,
                elem as usize,
            ),
            activation_bytes: (batch
                * opts
                    .plan_prefill_chunk
                    .map_or(context, |c| c.clamp(1, context))
                * (4 * spec.hidden_size + 2 * spec.intermediate_size))
                as u64
                * elem
                + (batch * spec.vocab_size * 4) as u64,
            prefetch_depth: opts.prefetch_depth,
            context,
            dense_bytes: parts
                .iter()
                .map(|p| p.as_ref().map_or(0, |(d, _)| compute_bytes(&d.entry)))
                .collect(),
        };
        let plan = make_plan(&inputs, opts.budget)?;

        let names = &spec.tensors;
        let (embed_name, lm_head_name) = (names.embed_weight(), names.lm_head_weight());
        let lm_head_bias_name = format!("{}.bias", names.lm_head);
        // A tied LM head's own bias travels with the final norm.
        let mut tied_bias = None;
        let norm = {
            let mut u = units.read_resident(norm_entry, device, kind)?;
            let bias = if names.final_norm_bias {
                Some(u.take(&format!("{}.bias", names.final_norm))?)
            } else {
                None
            };
            if spec.tie_word_embeddings && names.lm_head_bias {
                tied_bias = Some(u.take(&lm_head_bias_name)?);
            }
            NormWeights::bind(spec.norm.kind, u.take(&names.final_norm_weight())?, bias)?
        };
        let mut resident_bytes = norm_entry.data_len;
        let embed = if plan.embedding_on_host {
            HeadMatrix::Mapped(units.mapped(embed_entry, &embed_name)?, 0)
        } else {
            resident_bytes += embed_entry.data_len;
            HeadMatrix::Resident(
                units
                    .read_resident(embed_entry, device, kind)?
                    .take(&embed_name)?,
            )
        };
        let lm_head_bias = match lm_head_entry {
            Some(e) if names.lm_head_bias => Some(
                units
                    .read_resident_only(e, device, kind, |n| n == lm_head_bias_name)?
                    .take(&lm_head_bias_name)?,
            ),
            _ => tied_bias,
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
                let w = units
                    .read_resident_only(e, device, kind, |n| n == lm_head_name)?
                    .take(&lm_head_name)?;
                HeadMatrix::Resident(if spec.lm_head_norm {
                    crate::head::normalize_rows_l2(&w)?
                } else {
                    w
                })
            }
            (Some(e), Some(c), _) => {
                let m = units.mapped(e, &lm_head_name)?;
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
            let tensors = units.read_resident(layer_entries[i], device, kind)?;
            let mut w = LayerWeights::from_unit(&spec, i, tensors)?;
            w.fuse()?;
            resident[i] = Some(w);
            // The separate projections just freed would otherwise stay in the heap, holes the
            // next layer's reads do not fill: give them back so fusing costs no peak memory.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free memory; no pointer is invalidated.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        // Streamed sparse layers: the reader reads their dense parts (or they stay resident,
        // where the plan keeps them), the routed experts are read after routing.
        let mut layers = layers;
        let mut read_regions = layer_regions.clone();
        let mut expert_layers: Vec<Option<LayerParts>> = (0..layers.len()).map(|_| None).collect();
        let mut expert_regions: Vec<UnitRegion> = vec![];
        for &i in &plan.streamed_layers {
            let Some((dense, experts)) = parts[i].take() else {
                continue;
            };
            let first = expert_regions.len();
            let mut entries = Vec::with_capacity(experts.len());
            for p in experts {
                entries.push(p.entry);
                expert_regions.push(p.region);
            }
            layers[i] = dense.entry;
            read_regions[i] = dense.region;
            expert_layers[i] = Some(LayerParts { first, entries });
        }
        for &i in &plan.dense_resident_layers {
            let names: std::collections::HashSet<&str> =
                layers[i].tensors.iter().map(|t| t.name.as_str()).collect();
            let u =
                units.read_resident_only(layer_entries[i], device, kind, |n| names.contains(n))?;
            let mut w = LayerWeights::from_unit_parts(&spec, i, u, false)?;
            w.fuse()?;
            resident[i] = Some(w);
        }
        let read_layers: Vec<usize> = plan
            .streamed_layers
            .iter()
            .copied()
            .filter(|i| !plan.dense_resident_layers.contains(i))
            .collect();
        let mut stream_slot = vec![None; layers.len()];
        for (slot, &i) in read_layers.iter().enumerate() {
            stream_slot[i] = Some(slot);
        }
        let refs: Vec<&UnitRegion> = read_layers.iter().map(|&i| &read_regions[i]).collect();
        let depth = opts.prefetch_depth.max(1);
        // On CPU the kernels can read the page cache in place; a device needs host bytes to copy.
        let mode = ReadMode::for_device(device, opts.direct_io);
        let reader = if refs.is_empty() {
            None
        } else {
            // Kept mappings pay when the streamed layers stay in the page cache from one sweep
            // to the next; a model that cannot stay cached is read again every sweep anyway,
            // and unmapped pages are the cheaper ones for the kernel to reclaim.
            let streamed: u64 = refs.iter().map(|r| r.bytes_read()).sum();
            let room = crate::plan::host_available().unwrap_or(0) / 4 * 3;
            let keep = mode == ReadMode::Map && streamed <= room;
            Some(LayerReader::start_regions(
                &refs,
                depth,
                mode,
                units.original,
                keep,
            )?)
        };
        let experts = if expert_regions.is_empty() {
            None
        } else {
            let refs: Vec<&UnitRegion> = expert_regions.iter().collect();
            let reader = PartReader::open(&refs, mode, units.original)?;
            let total: u64 = (0..reader.len()).map(|i| reader.part_bytes(i)).sum();
            let budget = match opts.expert_cache {
                ExpertCacheSize::Bytes(b) => b,
                // CPU: what the plan leaves of the budget (everything that fits stays); a
                // plan with its resident layers forced has no budget of its own: half the free
                // host memory, as a derived budget is. A device: the cache holds host buffers,
                // so half the free host memory less the host staging buffers.
                ExpertCacheSize::Auto if device == Device::Cpu => (if plan.device_budget > 0 {
                    plan.device_budget
                } else {
                    crate::plan::host_available().unwrap_or(0) / 2
                })
                .saturating_sub(
                    plan.head_bytes
                        + plan.kv_bytes
                        + plan.activation_bytes
                        + plan.staging_bytes
                        + plan.resident_layer_bytes
                        + plan.dense_resident_bytes,
                ),
                ExpertCacheSize::Auto => (crate::plan::host_available().unwrap_or(0) / 2)
                    .saturating_sub(plan.staging_bytes),
            };
            let mut guides: Vec<Option<Guide>> = (0..layer_entries.len()).map(|_| None).collect();
            if opts.expert_guess {
                for (i, g) in guides.iter_mut().enumerate() {
                    if expert_layers[i].is_none() {
                        continue;
                    }
                    *g = Some(read_guide(units, &spec, i, layer_entries[i], device, kind)?);
                }
            }
            Some(ExpertStreams {
                reader,
                layers: expert_layers,
                cache: ExpertCache::new(budget.min(total)),
                evicting: false,
                guides,
                guessed: vec![vec![]; layer_entries.len()],
            })
        };
        resident_bytes += plan.resident_layer_bytes + plan.dense_resident_bytes;
        let staging_bytes = plan.staging_bytes;
        let windows: Vec<usize> = spec.sliding_windows.iter().flatten().copied().collect();
        let window = windows.first().copied();
        if windows.iter().any(|w| Some(*w) != window) {
            return Err(CoreError::InvalidInput(
                "layers with different sliding-window sizes are not supported".into(),
            ));
        }
        // transformers rounds the multiplier to the compute dtype first (Gemma).
        let embed_scale = match spec.embed_scale {
            Some(s) => Some(Tensor::from(s).f_to_kind(kind)?.f_to_device(device)?),
            None => None,
        };
        let rope = RopeTables::new(&spec.rope, device)?;
        let local_rope = match &spec.local_rope {
            Some(r) => Some(RopeTables::new(r, device)?),
            None => None,
        };
        // The offsets come from the headers read when planning: every file must still be that
        // file (not replaced or modified since), now that the reader has its own baseline and
        // the resident weights are read.
        for st in units.stamps {
            if !st.unchanged()? {
                return Err(CoreError::SourceChanged {
                    path: st.path.clone(),
                });
            }
        }
        Ok(Engine {
            spec,
            source_dir: source_dir.to_path_buf(),
            in_place: units.original,
            layer_regions,
            row_orders: units.row_orders.to_vec(),
            device,
            kind,
            embed,
            norm,
            lm_head,
            lm_head_bias,
            embed_scale,
            layers,
            resident,
            stream_slot,
            reader,
            experts,
            read_mode: mode,
            dequant_buffers: DequantBuffers::default(),
            plan,
            rope,
            local_rope,
            window,
            resident_bytes,
            staging_bytes,
            profile: Profile::default(),
            on_prefill_layer: None,
        })
    }
}
