//! Turning a unit's bytes into tensors on the compute device, and checking a split against the
//! model's spec before anything runs. Compressed tensors are expanded by [`crate::dequant`].

use std::collections::BTreeMap;
use std::path::Path;

use rabbit_models::{names, ModelSpec};
use rabbit_split::dtype::Dtype;
use rabbit_split::manifest::{Manifest, UnitEntry};
use tch::{Device, Kind, Tensor};

use crate::dequant::dequantize_cpu;
pub use crate::dequant::{dequantize, DequantBuffers};
use crate::error::{CoreError, Result};

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
        _ => None,
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double)
}

/// Named tensors of one unit on the compute device, in the compute dtype.
pub struct UnitTensors {
    tensors: BTreeMap<String, Tensor>,
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
        let mut raw = BTreeMap::new();
        for t in &entry.tensors {
            let stored = kind_of(t.dtype).ok_or_else(|| CoreError::BadTensor {
                file: entry.file.clone().into(),
                tensor: t.name.clone(),
                reason: format!("dtype {} cannot hold weights", t.dtype.name()),
            })?;
            let end = t
                .offset
                .checked_add(t.len)
                .filter(|e| *e as usize <= data.len());
            if end.is_none() {
                return Err(CoreError::BadTensor {
                    file: entry.file.clone().into(),
                    tensor: t.name.clone(),
                    reason: format!("bytes {}..+{} lie outside the unit's data", t.offset, t.len),
                });
            }
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            // SAFETY: the range was bounds-checked above and the split guarantees natural
            // alignment; the view lives no longer than `self`, which the caller drops before
            // recycling `data`.
            let view = unsafe {
                Tensor::f_from_blob(
                    data.as_ptr().add(t.offset as usize),
                    &shape,
                    &[],
                    stored,
                    Device::Cpu,
                )?
            };
            // Stored bytes go to the device as they are (fewer bytes over PCIe); conversion and
            // dequantization happen there.
            let on_device = if device == Device::Cpu {
                view
            } else {
                view.f_to_device(device)?
            };
            raw.insert(t.name.clone(), on_device);
        }
        Self::assemble_into(entry, raw, kind, buffers)
    }

    /// Turns a unit's stored tensors (already on the compute device, stored dtypes) into compute
    /// tensors: floats converted to `kind`, quantized pairs dequantized under their original name.
    pub fn assemble(entry: &UnitEntry, raw: BTreeMap<String, Tensor>, kind: Kind) -> Result<Self> {
        Self::assemble_into(entry, raw, kind, None)
    }

    fn assemble_into(
        entry: &UnitEntry,
        mut raw: BTreeMap<String, Tensor>,
        kind: Kind,
        mut buffers: Option<&mut DequantBuffers>,
    ) -> Result<Self> {
        let missing = |name: &str| CoreError::BadTensor {
            file: entry.file.clone().into(),
            tensor: name.to_string(),
            reason: "named by the manifest's quantized list but absent".into(),
        };
        let start = std::time::Instant::now();
        let mut tensors = BTreeMap::new();
        for q in &entry.quantized {
            let codes = raw.remove(&q.codes).ok_or_else(|| missing(&q.codes))?;
            let scales = raw.remove(&q.scales).ok_or_else(|| missing(&q.scales))?;
            let w = if codes.device() == Device::Cpu {
                dequantize_cpu(q, &codes, &scales, kind, buffers.as_deref_mut())?
            } else {
                dequantize(q, &codes, &scales, kind)?
            };
            tensors.insert(q.name.clone(), w);
        }
        let dequant_s = start.elapsed().as_secs_f64();
        for (name, t) in raw {
            if !is_float(t.kind()) {
                return Err(CoreError::BadTensor {
                    file: entry.file.clone().into(),
                    tensor: name,
                    reason: format!("{:?} tensor that no quantized entry claims", t.kind()),
                });
            }
            let t = if t.kind() == kind {
                t
            } else {
                t.f_to_kind(kind)?
            };
            tensors.insert(name, t);
        }
        Ok(UnitTensors {
            tensors,
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
                reason: "missing from the split".into(),
            })
    }

    /// All remaining tensors (to hand dequantization buffers back).
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors.into_values().collect()
    }

    /// Takes a tensor if present.
    pub fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }
}

/// A linear projection.
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    fn take(u: &mut UnitTensors, prefix: &str, name: &str, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: u.take(&format!("{prefix}{name}.weight"))?,
            bias: if bias {
                Some(u.take(&format!("{prefix}{name}.bias"))?)
            } else {
                None
            },
        })
    }

    /// `x @ W^T + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }
}

/// The weights of one decoder layer.
pub struct LayerWeights {
    /// Pre-attention RMSNorm.
    pub input_norm: Tensor,
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Attention output projection.
    pub o: Linear,
    /// Per-head q norm (Qwen3).
    pub q_norm: Option<Tensor>,
    /// Per-head k norm (Qwen3).
    pub k_norm: Option<Tensor>,
    /// Pre-MLP RMSNorm.
    pub post_norm: Tensor,
    /// MLP gate.
    pub gate: Linear,
    /// MLP up.
    pub up: Linear,
    /// MLP down.
    pub down: Linear,
}

impl LayerWeights {
    /// Picks layer `i`'s tensors out of its unit.
    pub fn from_unit(spec: &ModelSpec, i: usize, mut u: UnitTensors) -> Result<LayerWeights> {
        let p = names::layer_prefix(i);
        let qk_norm = |u: &mut UnitTensors, n: &str| -> Result<Option<Tensor>> {
            if spec.qk_norm {
                Ok(Some(u.take(&format!("{p}{n}"))?))
            } else {
                Ok(None)
            }
        };
        Ok(LayerWeights {
            input_norm: u.take(&format!("{p}{}", names::INPUT_NORM))?,
            q: Linear::take(&mut u, &p, names::Q_PROJ, spec.qkv_bias)?,
            k: Linear::take(&mut u, &p, names::K_PROJ, spec.qkv_bias)?,
            v: Linear::take(&mut u, &p, names::V_PROJ, spec.qkv_bias)?,
            o: Linear::take(&mut u, &p, names::O_PROJ, spec.o_bias)?,
            q_norm: qk_norm(&mut u, names::Q_NORM)?,
            k_norm: qk_norm(&mut u, names::K_NORM)?,
            post_norm: u.take(&format!("{p}{}", names::POST_ATTN_NORM))?,
            gate: Linear::take(&mut u, &p, names::GATE_PROJ, spec.mlp_bias)?,
            up: Linear::take(&mut u, &p, names::UP_PROJ, spec.mlp_bias)?,
            down: Linear::take(&mut u, &p, names::DOWN_PROJ, spec.mlp_bias)?,
        })
    }

    /// Every tensor of the layer (to hand dequantization buffers back).
    pub fn into_tensors(self) -> Vec<Tensor> {
        let mut out = vec![self.input_norm, self.post_norm];
        out.extend(self.q_norm);
        out.extend(self.k_norm);
        for l in [
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
        ] {
            out.push(l.weight);
            out.extend(l.bias);
        }
        out
    }
}

/// Checks that a split holds exactly the tensors, shapes and float dtypes the spec expects, so a
/// mismatch is reported by name before any compute (never a shape error mid-generation).
pub fn validate_split(spec: &ModelSpec, manifest: &Manifest, dir: &Path) -> Result<()> {
    // name -> (unit, logical shape, logical dtype): quantized tensors count under their
    // original name and shape.
    let mut found: BTreeMap<&str, (&UnitEntry, &[usize], Dtype)> = BTreeMap::new();
    for u in &manifest.units {
        for t in &u.tensors {
            found.insert(t.name.as_str(), (u, &t.shape, t.dtype));
        }
        for q in &u.quantized {
            found.insert(q.name.as_str(), (u, &q.shape, q.dtype));
        }
    }
    if manifest.num_layers() != spec.num_layers {
        return Err(CoreError::InvalidInput(format!(
            "{}: split has {} layers but config.json says num_hidden_layers = {}",
            dir.display(),
            manifest.num_layers(),
            spec.num_layers
        )));
    }
    let mut expected = spec.tensor_shapes();
    if spec.tie_word_embeddings != manifest.tied_lm_head {
        return Err(CoreError::InvalidInput(format!(
            "{}: split tied_lm_head = {} but config.json tie_word_embeddings = {}",
            dir.display(),
            manifest.tied_lm_head,
            spec.tie_word_embeddings
        )));
    }
    for (name, shape) in expected.drain(..) {
        let Some(&(u, found_shape, dtype)) = found.get(name.as_str()) else {
            return Err(CoreError::BadTensor {
                file: dir.to_path_buf(),
                tensor: name,
                reason: "expected by config.json but absent from the split".into(),
            });
        };
        if found_shape != shape.as_slice() {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                tensor: name,
                reason: format!("shape {found_shape:?} but config.json implies {shape:?}"),
            });
        }
        if !kind_of(dtype).is_some_and(is_float) {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                tensor: name,
                reason: format!("dtype {} is not a float type", dtype.name()),
            });
        }
    }
    Ok(())
}
