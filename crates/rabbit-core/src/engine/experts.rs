//! Routed experts of streamed sparse layers, read only when a sweep's router picks them
//! ([`crate::reader::PartReader`]), and the expert cache that keeps the most recently used ones
//! within `--expert-cache` bytes. A batch reads the union of its rows' experts once per sweep.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use rabbit_models::ModelSpec;
use rabbit_split::layout::RowOrder;
use rabbit_split::manifest::UnitEntry;
use tch::{Device, Kind, Tensor};

use super::Profile;
use crate::decoder::moe::{ExpertSource, ExpertWeights};
use crate::error::{CoreError, Result};
use crate::reader::{PartReader, UnitBytes};
use crate::weights::{DequantBuffers, UnitTensors};

/// How many bytes of routed experts stay cached between sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertCacheSize {
    /// What the memory budget leaves once the plan is placed (everything that fits stays).
    #[default]
    Auto,
    /// At most this many bytes (`0`: off, every routed expert is read every time).
    Bytes(u64),
}

impl std::str::FromStr for ExpertCacheSize {
    type Err = String;

    /// `auto`, or a size (`2GiB`, `0` for off).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(ExpertCacheSize::Auto);
        }
        s.parse::<crate::plan::ByteSize>()
            .map(|b| ExpertCacheSize::Bytes(b.0))
            .map_err(|e| format!("`{s}` is neither `auto` nor a size such as 2GiB or 0: {e}"))
    }
}

/// Least-recently-used experts, by part, within a byte budget. (LRU rather than counts: decode
/// routing drifts with the text, and a least-recently-used set follows it without tuning.)
pub(crate) struct ExpertCache {
    budget: u64,
    used: u64,
    tick: u64,
    entries: HashMap<usize, (Arc<UnitBytes>, u64, u64)>,
    order: BTreeMap<u64, usize>,
}

impl ExpertCache {
    pub(crate) fn new(budget: u64) -> ExpertCache {
        ExpertCache {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The cached bytes of a part, marked as used now.
    fn get(&mut self, part: usize) -> Option<Arc<UnitBytes>> {
        self.tick += 1;
        let (bytes, _, last) = self.entries.get_mut(&part)?;
        self.order.remove(last);
        *last = self.tick;
        self.order.insert(self.tick, part);
        Some(bytes.clone())
    }

    /// Caches a part of `size` bytes, dropping the least recently used ones to make room;
    /// returns the parts dropped. A part larger than the whole budget is not cached.
    fn insert(&mut self, part: usize, bytes: Arc<UnitBytes>, size: u64) -> Vec<usize> {
        debug_assert!(
            !self.entries.contains_key(&part),
            "part {part} cached twice"
        );
        let mut dropped = vec![];
        if size > self.budget {
            return dropped;
        }
        while self.used + size > self.budget {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, s, _)) = self.entries.remove(&old) {
                self.used -= s;
            }
            dropped.push(old);
        }
        self.tick += 1;
        self.order.insert(self.tick, part);
        self.entries.insert(part, (bytes, size, self.tick));
        self.used += size;
        dropped
    }

    fn contains(&self, part: usize) -> bool {
        self.entries.contains_key(&part)
    }

    /// Bytes cached now.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// The budget.
    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }
}

/// The experts of one streamed sparse layer: their entries (offsets in each expert's part) and
/// the index of expert 0's part in the reader.
pub(crate) struct LayerParts {
    pub(crate) first: usize,
    pub(crate) entries: Vec<UnitEntry>,
}

/// A layer's router and the norm before it, kept resident to guess the layer's experts from an
/// earlier layer's hidden state and start reading them early.
pub(crate) struct Guide {
    pub(crate) norm: crate::decoder::NormWeights,
    pub(crate) router: crate::weights::Linear,
    /// The router's selection bias (DeepSeek-V3).
    pub(crate) bias: Option<Tensor>,
}

/// Every streamed sparse layer's experts, their reader and cache.
pub(crate) struct ExpertStreams {
    pub(crate) reader: PartReader,
    /// Per decoder layer, when its experts stream.
    pub(crate) layers: Vec<Option<LayerParts>>,
    pub(crate) cache: ExpertCache,
    /// Drop uncached experts from the page cache after use (cold benchmarks).
    pub(crate) evicting: bool,
    /// Per layer, when guessing ahead: its router and norm.
    pub(crate) guides: Vec<Option<Guide>>,
    /// Per layer: the experts guessed for it this sweep (read ahead), to score the guess.
    pub(crate) guessed: Vec<Vec<usize>>,
}

impl ExpertStreams {
    /// Guesses layer `j`'s experts from `h` (an earlier layer's input) and starts reading those
    /// not cached (advisory reads: the disk works while the layers before `j` compute).
    pub(crate) fn guess_ahead(
        &mut self,
        spec: &ModelSpec,
        j: usize,
        h: &tch::Tensor,
        profile: &mut Profile,
    ) -> Result<()> {
        let (Some(g), Some(parts), Some(moe)) = (
            self.guides.get(j).and_then(Option::as_ref),
            self.layers.get(j).and_then(Option::as_ref),
            spec.moe.as_ref(),
        ) else {
            return Ok(());
        };
        let width = *h.size().last().unwrap_or(&0);
        let x = crate::decoder::norm(&h.f_reshape([-1, width])?, &g.norm, &spec.norm)?;
        let (_, routes) = crate::decoder::moe::route(
            moe,
            crate::decoder::moe::Router {
                linear: &g.router,
                bias: g.bias.as_ref(),
            },
            &x,
            &format!("layer {j}"),
        )?;
        let guess = routes.experts();
        let first = parts.first;
        let todo: Vec<usize> = guess
            .iter()
            .map(|&e| first + e)
            .filter(|&p| !self.cache.contains(p))
            .collect();
        self.reader.advise(&todo);
        profile.expert_guesses += guess.len() as u64;
        profile.expert_guess_bytes += todo.iter().map(|&p| self.reader.part_bytes(p)).sum::<u64>();
        self.guessed[j] = guess;
        Ok(())
    }

    /// Bytes of every streamed expert.
    pub(crate) fn total_bytes(&self) -> u64 {
        (0..self.reader.len())
            .map(|i| self.reader.part_bytes(i))
            .sum()
    }
}

/// An [`ExpertSource`] over one streamed layer's experts for one sweep. Drop it with
/// [`StreamedExperts::finish`] once the layer is computed.
pub(crate) struct StreamedExperts<'a> {
    pub(crate) streams: &'a mut ExpertStreams,
    pub(crate) layer: usize,
    pub(crate) spec: &'a ModelSpec,
    pub(crate) device: Device,
    pub(crate) kind: Kind,
    pub(crate) packed: bool,
    pub(crate) row_orders: &'a [RowOrder],
    pub(crate) buffers: &'a mut DequantBuffers,
    pub(crate) profile: &'a mut Profile,
    /// The experts loaded, with the bytes their tensors may alias.
    held: BTreeMap<usize, (ExpertWeights, Arc<UnitBytes>)>,
    /// Parts read this sweep that the cache did not take.
    uncached: Vec<usize>,
    /// Seconds spent reading and staging experts (not compute).
    spent_s: f64,
}

impl<'a> StreamedExperts<'a> {
    /// The experts of `layer` for this sweep.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        streams: &'a mut ExpertStreams,
        layer: usize,
        spec: &'a ModelSpec,
        device: Device,
        kind: Kind,
        packed: bool,
        row_orders: &'a [RowOrder],
        buffers: &'a mut DequantBuffers,
        profile: &'a mut Profile,
    ) -> Self {
        StreamedExperts {
            streams,
            layer,
            spec,
            device,
            kind,
            packed,
            row_orders,
            buffers,
            profile,
            held: BTreeMap::new(),
            uncached: vec![],
            spent_s: 0.0,
        }
    }

    /// Hands the experts' tensors back (dequantization buffers), releases their bytes, and
    /// drops uncached parts from the page cache when evicting. Returns the seconds spent
    /// reading and staging experts (inside the layer's compute time).
    pub(crate) fn finish(mut self) -> f64 {
        for (_, (w, bytes)) in std::mem::take(&mut self.held) {
            self.buffers.reclaim(w.into_tensors().collect::<Vec<_>>());
            drop(bytes);
        }
        if self.streams.evicting {
            for p in std::mem::take(&mut self.uncached) {
                self.streams.reader.evict(p);
            }
        }
        self.spent_s
    }

    fn parts(&self) -> Result<&LayerParts> {
        self.streams.layers[self.layer]
            .as_ref()
            .ok_or_else(|| CoreError::Reader(format!("layer {} streams no experts", self.layer)))
    }
}

impl ExpertSource for StreamedExperts<'_> {
    fn load(&mut self, ids: &[usize]) -> Result<()> {
        let first = self.parts()?.first;
        let n = self.parts()?.entries.len();
        if let Some(&bad) = ids.iter().find(|&&e| e >= n) {
            return Err(CoreError::InvalidInput(format!(
                "the router chose expert {bad} of layer {}, which has {n}",
                self.layer
            )));
        }
        let guessed = std::mem::take(&mut self.streams.guessed[self.layer]);
        self.profile.expert_guess_hits += guessed.iter().filter(|e| ids.contains(e)).count() as u64;
        if self.streams.evicting {
            // A wrong guess read from the disk for nothing: its pages go, as a read's would.
            for e in guessed.iter().filter(|e| !ids.contains(e)) {
                if !self.streams.cache.contains(first + e) {
                    self.uncached.push(first + e);
                }
            }
        }
        let misses: Vec<usize> = ids
            .iter()
            .map(|&e| first + e)
            .filter(|&p| !self.streams.cache.contains(p))
            .collect();
        self.streams.reader.advise(&misses);
        Ok(())
    }

    fn expert(&mut self, e: usize) -> Result<&ExpertWeights> {
        if !self.held.contains_key(&e) {
            self.fetch(e)?;
        }
        Ok(&self.held[&e].0)
    }
}

impl StreamedExperts<'_> {
    /// Reads (or finds cached) expert `e` and makes its weights: called as the block reaches
    /// the expert, so it computes on one expert while the disk still reads the next ones
    /// (announced together by `load`).
    fn fetch(&mut self, e: usize) -> Result<()> {
        let first = self.parts()?.first;
        let l = self.layer;
        if e >= self.parts()?.entries.len() {
            return Err(CoreError::InvalidInput(format!(
                "expert {e} of layer {l} does not exist"
            )));
        }
        {
            let part = first + e;
            let size = self.streams.reader.part_bytes(part);
            self.profile.expert_loads += 1;
            self.profile.active_bytes += size;
            self.profile.layers[l].expert_loads += 1;
            let bytes = match self.streams.cache.get(part) {
                Some(b) => {
                    self.streams.reader.refresh(part, &b)?;
                    self.profile.expert_hits += 1;
                    self.profile.layers[l].expert_hits += 1;
                    b
                }
                None => {
                    let read = self.streams.reader.read(part)?;
                    let dt = read.read_time.as_secs_f64();
                    self.spent_s += dt;
                    self.profile.read_wait_s += dt;
                    self.profile.read_s += dt;
                    self.profile.bytes_streamed += read.bytes_read;
                    self.profile.expert_bytes += read.bytes_read;
                    let lp = &mut self.profile.layers[l];
                    lp.read_wait_s += dt;
                    lp.read_s += dt;
                    lp.bytes += read.bytes_read;
                    let b = Arc::new(read.bytes);
                    let dropped = self.streams.cache.insert(part, b.clone(), size);
                    if !self.streams.cache.contains(part) {
                        self.uncached.push(part);
                    }
                    if self.streams.evicting {
                        // A dropped part this sweep still holds is still mapped (the page
                        // cache cannot drop it now): it goes when the layer is done.
                        for d in dropped {
                            if d >= first && self.held.contains_key(&(d - first)) {
                                self.uncached.push(d);
                            } else {
                                self.streams.reader.evict(d);
                            }
                        }
                    }
                    b
                }
            };
            let stage = Instant::now();
            let entry = &self.streams.layers[self.layer]
                .as_ref()
                .expect("checked above")
                .entries[e];
            let mut tensors = UnitTensors::from_unit_bytes(
                entry,
                &bytes,
                self.device,
                self.kind,
                self.spec.fp8_block,
                Some(self.buffers),
                self.row_orders,
                self.packed,
            )?;
            self.profile.packed_weights += tensors.packed_len() as u64;
            self.profile.dequant_s += tensors.dequant_s;
            let w = tensors.take_expert(self.spec, self.layer, e)?;
            let staged = stage.elapsed().as_secs_f64();
            self.spent_s += staged;
            self.profile.stage_s += staged - tensors.dequant_s;
            let lp = &mut self.profile.layers[l];
            lp.stage_s += staged - tensors.dequant_s;
            lp.dequant_s += tensors.dequant_s;
            self.held.insert(e, (w, bytes));
        }
        Ok(())
    }
}
