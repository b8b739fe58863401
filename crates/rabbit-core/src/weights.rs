//! Turning a unit's bytes into tensors on the compute device, and checking a split against the
//! model's spec before anything runs.

use std::collections::BTreeMap;
use std::path::Path;

use rabbit_models::{names, ModelSpec};
use rabbit_split::dtype::Dtype;
use rabbit_split::manifest::{Manifest, UnitEntry};
use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};

/// The libtorch kind of a stored dtype (only the float types a checkpoint's weights use).
pub fn kind_of(d: Dtype) -> Option<Kind> {
    match d {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Named tensors of one unit on the compute device, in the compute dtype.
pub struct UnitTensors {
    tensors: BTreeMap<String, Tensor>,
    file: String,
}

impl UnitTensors {
    /// Views the unit's tensors inside `data` (the unit's data region) and moves/converts them to
    /// `device`/`kind`. On CPU with a matching dtype the tensors alias `data`: the caller must drop
    /// this value before reusing the buffer.
    pub fn from_region(entry: &UnitEntry, data: &[u8], device: Device, kind: Kind) -> Result<Self> {
        let mut tensors = BTreeMap::new();
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
            let on_device = if device == Device::Cpu {
                if stored == kind {
                    view
                } else {
                    view.f_to_kind(kind)?
                }
            } else {
                // Copy the stored bytes first (fewer bytes over PCIe), convert on the device.
                view.f_to_device(device)?.f_to_kind(kind)?
            };
            tensors.insert(t.name.clone(), on_device);
        }
        Ok(UnitTensors {
            tensors,
            file: entry.file.clone(),
        })
    }

    /// Wraps tensors that already own their memory.
    pub fn from_tensors(tensors: Vec<(String, Tensor)>, file: &str) -> Self {
        UnitTensors {
            tensors: tensors.into_iter().collect(),
            file: file.to_string(),
        }
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
}

/// Checks that a split holds exactly the tensors, shapes and float dtypes the spec expects, so a
/// mismatch is reported by name before any compute (never a shape error mid-generation).
pub fn validate_split(spec: &ModelSpec, manifest: &Manifest, dir: &Path) -> Result<()> {
    let mut found: BTreeMap<&str, (&UnitEntry, &rabbit_split::manifest::TensorEntry)> =
        BTreeMap::new();
    for u in &manifest.units {
        for t in &u.tensors {
            found.insert(t.name.as_str(), (u, t));
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
        let Some((u, t)) = found.get(name.as_str()) else {
            return Err(CoreError::BadTensor {
                file: dir.to_path_buf(),
                tensor: name,
                reason: "expected by config.json but absent from the split".into(),
            });
        };
        if t.shape != shape {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                tensor: name,
                reason: format!("shape {:?} but config.json implies {:?}", t.shape, shape),
            });
        }
        if kind_of(t.dtype).is_none() {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                tensor: name,
                reason: format!("dtype {} is not a float type", t.dtype.name()),
            });
        }
    }
    Ok(())
}
