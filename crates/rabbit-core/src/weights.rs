//! Turning a unit's bytes into tensors on the compute device, and checking a split against the
//! model's spec before anything runs. Compressed tensors are expanded by [`crate::dequant`].

use std::collections::BTreeMap;

use rabbit_models::{ModelSpec, Role};
use rabbit_split::dtype::Dtype;
use rabbit_split::layout::RowOrder;
use rabbit_split::manifest::UnitEntry;
use tch::{Device, Kind, Tensor};

use crate::decoder::moe::ExpertWeights;
use crate::decoder::NormWeights;
use crate::dequant::dequantize_cpu;
pub use crate::dequant::{dequantize, DequantBuffers};
use crate::error::{CoreError, Result};
use crate::qgemv::PackedWeight;
use crate::reader::UnitBytes;

/// The libtorch kind of a stored dtype (the float types of weights, and the integer types of
/// quantized codes).
pub fn kind_of(d: Dtype) -> Option<Kind> {
    match d {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        Dtype::U8 => Some(Kind::Uint8),
        Dtype::I8 => Some(Kind::Int8),
        Dtype::F8_E4M3 => Some(Kind::Float8e4m3fn),
        _ => None,
    }
}

pub(crate) fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double)
}

/// Named tensors of one unit on the compute device, in the compute dtype.
pub struct UnitTensors {
    tensors: BTreeMap<String, Tensor>,
    /// Compressed weights kept as stored (see [`UnitTensors::from_unit_bytes`]).
    packed: BTreeMap<String, PackedWeight>,
    file: String,
    /// Time spent dequantizing (compressed splits).
    pub dequant_s: f64,
}

impl UnitTensors {
    /// Views the unit's tensors inside `data` (the unit's data region) and moves/converts them to
    /// `device`/`kind`, dequantizing compressed ones. On CPU with a matching dtype the tensors
    /// alias `data`: the caller must drop this value before reusing the buffer.
    pub fn from_region(entry: &UnitEntry, data: &[u8], device: Device, kind: Kind) -> Result<Self> {
        Self::from_region_into(entry, data, device, kind, None)
    }

    /// [`UnitTensors::from_region`], dequantizing on the CPU into `buffers` when given (hand the
    /// layer's tensors back with [`DequantBuffers::reclaim`] once it is computed).
    pub fn from_region_into(
        entry: &UnitEntry,
        data: &[u8],
        device: Device,
        kind: Kind,
        buffers: Option<&mut DequantBuffers>,
    ) -> Result<Self> {
        let get = |offset: u64, len: u64| {
            let end = usize::try_from(offset.checked_add(len)?).ok()?;
            data.get(offset as usize..end)
        };
        let raw = view_tensors(entry, &get, device, &[])?;
        Self::assemble_into(entry, raw, kind, None, buffers, false)
    }

    /// [`UnitTensors::from_region_into`] of a unit as the reader delivers it (one buffer, or one
    /// mapping per extent), regrouping the rows of the tensors `row_orders` names (streaming in
    /// place: the split would have done it on disk). With `packed`, compressed weights the CPU
    /// can apply as stored are kept so ([`PackedWeight`]: for sweeps of a few positions, where
    /// reading codes beats writing and reading a dequantized copy). `fp8` is the block size of
    /// FP8 weights' scales ([`rabbit_models::ModelSpec::fp8_block`]).
    #[allow(clippy::too_many_arguments)]
    pub fn from_unit_bytes(
        entry: &UnitEntry,
        bytes: &UnitBytes,
        device: Device,
        kind: Kind,
        fp8: Option<[usize; 2]>,
        buffers: Option<&mut DequantBuffers>,
        row_orders: &[RowOrder],
        packed: bool,
    ) -> Result<Self> {
        let get = |offset: u64, len: u64| bytes.get(offset, len);
        let raw = view_tensors(entry, &get, device, row_orders)?;
        Self::assemble_into(entry, raw, kind, fp8, buffers, packed)
    }

    /// Turns a unit's stored tensors (already on the compute device, stored dtypes) into compute
    /// tensors: floats converted to `kind`, quantized pairs dequantized under their original name,
    /// FP8 weights with their block scales (blocks of `fp8`) too.
    pub fn assemble(
        entry: &UnitEntry,
        raw: BTreeMap<String, Tensor>,
        kind: Kind,
        fp8: Option<[usize; 2]>,
    ) -> Result<Self> {
        Self::assemble_into(entry, raw, kind, fp8, None, false)
    }

    fn assemble_into(
        entry: &UnitEntry,
        mut raw: BTreeMap<String, Tensor>,
        kind: Kind,
        fp8: Option<[usize; 2]>,
        mut buffers: Option<&mut DequantBuffers>,
        pack: bool,
    ) -> Result<Self> {
        let missing = |name: &str| CoreError::BadTensor {
            file: entry.file.clone().into(),
            tensor: name.to_string(),
            reason: "named by the manifest's quantized list but absent".into(),
        };
        let start = std::time::Instant::now();
        let mut tensors = BTreeMap::new();
        let mut packed = BTreeMap::new();
        for q in &entry.quantized {
            let codes = raw.remove(&q.codes).ok_or_else(|| missing(&q.codes))?;
            let scales = raw.remove(&q.scales).ok_or_else(|| missing(&q.scales))?;
            if let Some(p) = pack
                .then(|| PackedWeight::new(q, &codes, &scales, kind))
                .flatten()
            {
                packed.insert(q.name.clone(), p);
                continue;
            }
            let w = if codes.device() == Device::Cpu {
                dequantize_cpu(q, &codes, &scales, kind, buffers.as_deref_mut())?
            } else {
                dequantize(q, &codes, &scales, kind)?
            };
            tensors.insert(q.name.clone(), w);
        }
        crate::fp8::dequantize_fp8_pairs(&entry.file, &mut raw, &mut tensors, kind, fp8)?;
        crate::mxfp4::dequantize_mxfp4_pairs(&entry.file, &mut raw, &mut tensors, kind)?;
        let dequant_s = start.elapsed().as_secs_f64();
        for (name, t) in raw {
            if !is_float(t.kind()) {
                return Err(CoreError::BadTensor {
                    file: entry.file.clone().into(),
                    tensor: name,
                    reason: format!("{:?} tensor that no quantized entry claims", t.kind()),
                });
            }
            let t = if t.kind() == kind || keep_f32(&name, &t) {
                t
            } else {
                t.f_to_kind(kind)?
            };
            tensors.insert(name, t);
        }
        Ok(UnitTensors {
            tensors,
            packed,
            file: entry.file.clone(),
            dequant_s,
        })
    }

    /// Takes a tensor out by full name.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| CoreError::BadTensor {
                file: self.file.clone().into(),
                tensor: name.to_string(),
                reason: "missing from its unit (the split or the checkpoint)".into(),
            })
    }

    /// How many compressed weights are kept packed.
    pub fn packed_len(&self) -> usize {
        self.packed.len()
    }

    /// Takes a projection's weight by full name: kept packed, or a tensor.
    pub fn take_weight(&mut self, name: &str) -> Result<LinearWeight> {
        match self.packed.remove(name) {
            Some(p) => Ok(LinearWeight::Packed(p)),
            None => self.take(name).map(LinearWeight::Dense),
        }
    }

    /// All remaining tensors (to hand dequantization buffers back).
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors.into_values().collect()
    }

    /// Takes a tensor if present.
    pub fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Takes routed expert `e` of layer `i` (its gate, up and down projections, or gpt-oss's
    /// stacked gate/up and down with their biases).
    pub fn take_expert(&mut self, spec: &ModelSpec, i: usize, e: usize) -> Result<ExpertWeights> {
        let p = spec.tensors.prefix(i);
        let params = spec.layer_params(i);
        let name = |role: Role| {
            params
                .iter()
                .find(|q| q.role == role && q.expert == Some(e))
                .map(|q| q.weight_name(&p))
        };
        let file = self.file.clone();
        let need = |role: Role| {
            name(role).ok_or_else(|| CoreError::BadTensor {
                file: file.clone().into(),
                tensor: format!("expert {e} {role:?}"),
                reason: "the family's inventory has no such tensor".into(),
            })
        };
        // MXFP4 blocks were dequantized under the name of the float tensor they stand for.
        let stacked = |plain: Role, blocks: Role| {
            name(plain).or_else(|| name(blocks).map(|n| n.replacen("_blocks", "", 1)))
        };
        if let Some(gate_up) = stacked(Role::ExpertGateUpT, Role::ExpertGateUpBlocks) {
            // Stored `[in, out]`, applied as `x · W`: a transposed view serves `linear`.
            let down = stacked(Role::ExpertDownT, Role::ExpertDownBlocks)
                .map_or_else(|| need(Role::ExpertDownT), Ok)?;
            let mut part = |w: String, b: Role| -> Result<Linear> {
                let weight = LinearWeight::Dense(self.take(&w)?.f_transpose(0, 1)?);
                Ok(Linear {
                    weight,
                    bias: Some(self.take(&need(b)?)?),
                })
            };
            let up = part(gate_up, Role::ExpertGateUpBias)?;
            let down = part(down, Role::ExpertDownBias)?;
            return Ok(ExpertWeights {
                gate: None,
                up,
                down,
            });
        }
        let mut get = |role: Role| -> Result<Linear> {
            let weight = self.take_weight(&need(role)?)?;
            Ok(Linear { weight, bias: None })
        };
        Ok(ExpertWeights {
            gate: Some(get(Role::ExpertGate)?),
            up: get(Role::ExpertUp)?,
            down: get(Role::ExpertDown)?,
        })
    }
}

/// Views (or, when the bytes are not aligned for their dtype, copies) each tensor of a unit out
/// of its region and moves it to `device` in its stored dtype; rows regrouped as `row_orders`
/// says.
fn view_tensors<'a>(
    entry: &UnitEntry,
    get: &dyn Fn(u64, u64) -> Option<&'a [u8]>,
    device: Device,
    row_orders: &[RowOrder],
) -> Result<BTreeMap<String, Tensor>> {
    let mut raw = BTreeMap::new();
    for t in &entry.tensors {
        let stored = kind_of(t.dtype).ok_or_else(|| CoreError::BadTensor {
            file: entry.file.clone().into(),
            tensor: t.name.clone(),
            reason: format!("dtype {} cannot hold weights", t.dtype.name()),
        })?;
        let bytes = get(t.offset, t.len).ok_or_else(|| CoreError::BadTensor {
            file: entry.file.clone().into(),
            tensor: t.name.clone(),
            reason: format!("bytes {}..+{} lie outside the unit's data", t.offset, t.len),
        })?;
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let numel: i64 = shape.iter().product();
        if numel as u64 * t.dtype.size_bytes() as u64 != t.len {
            return Err(CoreError::BadTensor {
                file: entry.file.clone().into(),
                tensor: t.name.clone(),
                reason: format!("{} bytes for shape {:?}", t.len, t.shape),
            });
        }
        let view = if (bytes.as_ptr() as usize).is_multiple_of(t.dtype.size_bytes().max(1)) {
            // SAFETY: `bytes` holds exactly the tensor (length checked above) and is aligned for
            // its dtype; the view lives no longer than the unit's tensors, which the caller
            // drops before recycling the region.
            unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], stored, Device::Cpu)? }
        } else {
            // A safetensors file whose header length is not a multiple of 8 (old writers) puts
            // its tensors off their natural alignment: copy rather than view.
            aligned_copy(bytes, &shape, stored)?
        };
        // Stored bytes go to the device as they are (fewer bytes over PCIe); conversion and
        // dequantization happen there.
        let on_device = if device == Device::Cpu {
            view
        } else {
            view.f_to_device(device)?
        };
        let on_device = match RowOrder::of(row_orders, &t.name) {
            Some(o) => reorder_rows(&on_device, o)?,
            None => on_device,
        };
        raw.insert(t.name.clone(), on_device);
    }
    Ok(raw)
}

/// A fresh CPU tensor holding a copy of `bytes`.
pub(crate) fn aligned_copy(bytes: &[u8], shape: &[i64], stored: Kind) -> Result<Tensor> {
    let t = Tensor::f_empty(shape, (stored, Device::Cpu))?;
    // SAFETY: `t` is a fresh contiguous tensor of exactly `bytes.len()` bytes (the caller
    // checked the length against the shape).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr() as *mut u8, bytes.len());
    }
    Ok(t)
}

/// Regroups a tensor's rows: its leading dimension cut into `o.order.len()` equal blocks, block
/// `i` of the result is block `o.order[i]` of `t` (what the split stores on disk).
pub(crate) fn reorder_rows(t: &Tensor, o: &RowOrder) -> Result<Tensor> {
    let shape = t.size();
    let blocks = o.order.len() as i64;
    if shape
        .first()
        .is_none_or(|&rows| rows == 0 || rows % blocks != 0)
    {
        return Err(CoreError::InvalidInput(format!(
            "{}: shape {shape:?} cannot be regrouped into {blocks} row blocks",
            o.tensor
        )));
    }
    let idx: Vec<i64> = o.order.iter().map(|&b| b as i64).collect();
    let idx = Tensor::from_slice(&idx).f_to_device(t.device())?;
    Ok(t.f_reshape([blocks, -1])?
        .f_index_select(0, &idx)?
        .f_reshape(&shape)?)
}

/// Buffers transformers keeps in f32 whatever the model's dtype
/// (`_keep_in_fp32_modules_strict`): DeepSeek-V3's expert-choice bias, where a bf16 rounding
/// could change which experts are picked.
const KEEP_F32: &[&str] = &[".e_score_correction_bias"];

fn keep_f32(name: &str, t: &Tensor) -> bool {
    t.kind() == Kind::Float && KEEP_F32.iter().any(|s| name.ends_with(s))
}

/// A projection's `[out, in]` weight.
pub enum LinearWeight {
    /// A tensor in the compute dtype.
    Dense(Tensor),
    /// Compressed codes applied as stored ([`PackedWeight`]).
    Packed(PackedWeight),
}

/// A linear projection.
pub struct Linear {
    /// `[out, in]`.
    pub weight: LinearWeight,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Its dense tensors (to hand dequantization buffers back).
    pub fn into_tensors(self) -> impl Iterator<Item = Tensor> {
        let w = match self.weight {
            LinearWeight::Dense(w) => Some(w),
            LinearWeight::Packed(_) => None,
        };
        w.into_iter().chain(self.bias)
    }

    /// `x @ W^T + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(x.f_linear(w, self.bias.as_ref())?),
            LinearWeight::Packed(p) => p.linear(x, self.bias.as_ref()),
        }
    }
}

/// The weights of one decoder layer, by role (the family's inventory says which roles exist).
pub struct LayerWeights {
    linears: BTreeMap<Role, Linear>,
    norms: BTreeMap<Role, NormWeights>,
    /// Plain vectors ([`Role::is_vector`]).
    vectors: BTreeMap<Role, Tensor>,
    /// The routed experts held with the layer (all of them, or none when they are streamed
    /// after routing).
    experts: BTreeMap<usize, ExpertWeights>,
    file: String,
}

impl LayerWeights {
    /// Picks layer `i`'s tensors out of its unit, as the spec's tensor inventory names them.
    pub fn from_unit(spec: &ModelSpec, i: usize, u: UnitTensors) -> Result<LayerWeights> {
        Self::from_unit_parts(spec, i, u, true)
    }

    /// [`LayerWeights::from_unit`], with the routed experts' tensors taken too when
    /// `with_experts` (else they are read after routing and the unit has none of them).
    pub fn from_unit_parts(
        spec: &ModelSpec,
        i: usize,
        mut u: UnitTensors,
        with_experts: bool,
    ) -> Result<LayerWeights> {
        let p = spec.tensors.prefix(i);
        let mut linears = BTreeMap::new();
        let mut norms = BTreeMap::new();
        let mut vectors = BTreeMap::new();
        let mut experts = BTreeMap::new();
        for param in spec.layer_params(i) {
            if param.role.is_expert() {
                continue;
            }
            let name = param.weight_name(&p);
            let bias = if param.bias {
                Some(u.take(&format!("{p}{}.bias", param.name))?)
            } else {
                None
            };
            if param.role.is_vector() {
                vectors.insert(param.role, u.take(&name)?);
            } else if param.role.is_norm() {
                let weight = u.take(&name)?;
                norms.insert(param.role, NormWeights::bind(spec.norm.kind, weight, bias)?);
            } else {
                let weight = u.take_weight(&name)?;
                linears.insert(param.role, Linear { weight, bias });
            }
        }
        if with_experts {
            if let Some(moe) = spec.moe.as_ref().filter(|_| spec.is_sparse(i)) {
                for e in 0..moe.num_experts {
                    experts.insert(e, u.take_expert(spec, i, e)?);
                }
            }
        }
        Ok(LayerWeights {
            linears,
            norms,
            vectors,
            experts,
            file: u.file.clone(),
        })
    }

    /// The routed experts the layer holds.
    pub fn experts(&self) -> &BTreeMap<usize, ExpertWeights> {
        &self.experts
    }

    /// The unit file the weights came from (for messages).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Fuses separate q/k/v into one `qkv` projection: one GEMM instead of three. For resident
    /// layers, done once at load (prefill +10% on the qwen2.5-1.5b shape); concatenating a
    /// streamed layer's weights every sweep would cost more than it saves, and fusing gate/up
    /// did not pay (docs/BENCHMARKS.md). The outputs are bit-identical to the separate
    /// projections'.
    pub fn fuse(&mut self) -> Result<()> {
        self.fuse_roles(&[Role::Q, Role::K, Role::V], Role::Qkv)
    }

    /// Replaces the `parts` projections by one `fused` projection of their stacked rows.
    fn fuse_roles(&mut self, parts: &[Role], fused: Role) -> Result<()> {
        if self.linears.contains_key(&fused) || !parts.iter().all(|r| self.linears.contains_key(r))
        {
            return Ok(());
        }
        let with_bias = parts
            .iter()
            .filter(|r| self.linears[r].bias.is_some())
            .count();
        if with_bias != 0 && with_bias != parts.len() {
            // Mixed biases (no family has them): keep them separate.
            return Ok(());
        }
        let mut weights: Vec<&Tensor> = Vec::with_capacity(parts.len());
        for r in parts {
            match &self.linears[r].weight {
                LinearWeight::Dense(w) => weights.push(w),
                // Packed weights are applied one by one.
                LinearWeight::Packed(_) => return Ok(()),
            }
        }
        let weight = LinearWeight::Dense(Tensor::f_cat(&weights, 0)?);
        let bias = if with_bias > 0 {
            let biases: Vec<&Tensor> = parts
                .iter()
                .filter_map(|r| self.linears[r].bias.as_ref())
                .collect();
            Some(Tensor::f_cat(&biases, 0)?)
        } else {
            None
        };
        for r in parts {
            self.linears.remove(r);
        }
        self.linears.insert(fused, Linear { weight, bias });
        Ok(())
    }

    /// The projection of a role, if the layer has one.
    pub fn linear(&self, role: Role) -> Option<&Linear> {
        self.linears.get(&role)
    }

    /// The vector of a role, if the layer has one.
    pub fn vector(&self, role: Role) -> Option<&Tensor> {
        self.vectors.get(&role)
    }

    /// The norm of a role, if the layer has one.
    pub fn norm(&self, role: Role) -> Option<&NormWeights> {
        self.norms.get(&role)
    }

    fn missing(&self, role: Role) -> CoreError {
        CoreError::BadTensor {
            file: self.file.clone().into(),
            tensor: format!("{role:?}"),
            reason: "the layer program needs this tensor but the family's inventory has none"
                .into(),
        }
    }

    /// The projection of a role the program cannot do without.
    pub fn req_linear(&self, role: Role) -> Result<&Linear> {
        self.linear(role).ok_or_else(|| self.missing(role))
    }

    /// The norm of a role the program cannot do without.
    pub fn req_norm(&self, role: Role) -> Result<&NormWeights> {
        self.norm(role).ok_or_else(|| self.missing(role))
    }

    /// Every tensor of the layer (to hand dequantization buffers back).
    pub fn into_tensors(self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for l in self.linears.into_values() {
            out.extend(l.into_tensors());
        }
        for n in self.norms.into_values() {
            out.extend(n.into_tensors());
        }
        out.extend(self.vectors.into_values());
        for e in self.experts.into_values() {
            out.extend(e.into_tensors());
        }
        out
    }
}
