//! Turning a unit's bytes into tensors on the compute device, and checking a split against the
//! model's spec before anything runs.

use std::collections::BTreeMap;
use std::path::Path;

use rabbit_models::{names, ModelSpec};
use rabbit_split::dtype::Dtype;
use rabbit_split::manifest::{Manifest, QuantizedEntry, UnitEntry};
use rabbit_split::{Compression, NF4_CODEBOOK};
use tch::{Device, Kind, Tensor};

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

/// Dequantizes one block-wise compressed tensor on whatever device `codes`/`scales` are on, into
/// `kind`: NF4 codes (two per byte, low nibble first) index the NF4 codebook, int8 codes are
/// scaled; one f32 scale (absmax) per block.
pub fn dequantize(
    q: &QuantizedEntry,
    codes: &Tensor,
    scales: &Tensor,
    kind: Kind,
) -> Result<Tensor> {
    let numel: i64 = q.shape.iter().product::<usize>() as i64;
    let block = q.block_size as i64;
    let blocks = scales.size()[0];
    let values = match q.scheme {
        Compression::Nf4 => {
            let high = codes.f_bitwise_right_shift_tensor_scalar(4)?;
            let low = codes.f_sub(&high.f_mul_scalar(16)?)?;
            let idx = Tensor::f_stack(&[low, high], -1)?
                .f_view([-1])?
                .f_to_kind(Kind::Int64)?;
            let book = Tensor::f_from_slice(&NF4_CODEBOOK)?.f_to_device(codes.device())?;
            book.f_index_select(0, &idx)?
        }
        Compression::Int8 => codes.f_to_kind(Kind::Float)?,
    };
    if values.size()[0] != blocks * block || numel > blocks * block {
        return Err(CoreError::InvalidInput(format!(
            "quantized tensor `{}`: {} codes and {blocks} scales do not make {numel} values in blocks of {block}",
            q.name,
            values.size()[0]
        )));
    }
    let shape: Vec<i64> = q.shape.iter().map(|&d| d as i64).collect();
    Ok(values
        .f_view([blocks, block])?
        .f_mul(&scales.f_view([blocks, 1])?)?
        .f_view([-1])?
        .f_narrow(0, 0, numel)?
        .f_view(shape.as_slice())?
        .f_to_kind(kind)?)
}

/// CPU dequantization written directly into the output tensor's memory, on all cores: libtorch
/// ops would materialise int64 indices and f32 temporaries several times the layer's size, which
/// is slower than reading the uncompressed layer. Per block, the 16 (NF4) scaled values are
/// computed once in the output dtype, then every byte is two table lookups.
fn dequantize_cpu(
    q: &QuantizedEntry,
    codes: &Tensor,
    scales: &Tensor,
    kind: Kind,
) -> Result<Tensor> {
    let numel: usize = q.shape.iter().product();
    let block = q.block_size;
    let blocks = scales.numel();
    let codes_per_block = match q.scheme {
        Compression::Nf4 => block / 2,
        Compression::Int8 => block,
    };
    if codes.numel() != blocks * codes_per_block
        || numel > blocks * block
        || !block.is_multiple_of(2)
    {
        return Err(CoreError::InvalidInput(format!(
            "quantized tensor `{}`: {} codes and {blocks} scales do not make {numel} values in blocks of {block}",
            q.name,
            codes.numel()
        )));
    }
    let elem = match kind {
        Kind::Float => 4,
        Kind::BFloat16 | Kind::Half => 2,
        other => {
            return Err(CoreError::InvalidInput(format!(
                "cannot dequantize into {other:?}"
            )))
        }
    };
    let codes = codes.f_contiguous()?;
    let scales = scales.f_contiguous()?.f_to_kind(Kind::Float)?;
    // SAFETY: contiguous CPU tensors of the checked element counts (U8/I8 codes, F32 scales),
    // alive for this function.
    let code_bytes =
        unsafe { std::slice::from_raw_parts(codes.data_ptr() as *const u8, codes.numel()) };
    let scale_vals = unsafe { std::slice::from_raw_parts(scales.data_ptr() as *const f32, blocks) };
    let shape: Vec<i64> = q.shape.iter().map(|&d| d as i64).collect();
    let out = Tensor::f_empty(shape.as_slice(), (kind, Device::Cpu))?;
    // SAFETY: fresh contiguous tensor of `numel` elements of `elem` bytes, written only here.
    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, numel * elem) };
    let to_bits = move |v: f32| -> u32 {
        match kind {
            Kind::Float => v.to_bits(),
            Kind::BFloat16 => {
                let b = v.to_bits();
                (b + 0x7fff + ((b >> 16) & 1)) >> 16
            }
            _ => half::f16::from_f32(v).to_bits() as u32,
        }
    };
    let scheme = q.scheme;
    let fill = move |first_block: usize, dst: &mut [u8]| {
        let mut table = [0u32; 16];
        let n_blocks = dst.len().div_ceil(block * elem);
        for b in 0..n_blocks {
            let gb = first_block + b;
            let s = scale_vals[gb];
            let end = ((b + 1) * block * elem).min(dst.len());
            let out_block = &mut dst[b * block * elem..end];
            let values = out_block.len() / elem;
            let src = &code_bytes[gb * codes_per_block..(gb + 1) * codes_per_block];
            let mut put = |i: usize, bits: u32| {
                out_block[i * elem..(i + 1) * elem].copy_from_slice(&bits.to_le_bytes()[..elem]);
            };
            match scheme {
                Compression::Nf4 => {
                    for (k, c) in NF4_CODEBOOK.iter().enumerate() {
                        table[k] = to_bits(c * s);
                    }
                    for (j, byte) in src.iter().enumerate() {
                        if 2 * j < values {
                            put(2 * j, table[(byte & 0x0f) as usize]);
                        }
                        if 2 * j + 1 < values {
                            put(2 * j + 1, table[(byte >> 4) as usize]);
                        }
                    }
                }
                Compression::Int8 => {
                    for (j, byte) in src.iter().take(values).enumerate() {
                        put(j, to_bits(*byte as i8 as f32 * s));
                    }
                }
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk_blocks = blocks.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (t, part) in dst.chunks_mut(chunk_blocks * block * elem).enumerate() {
            let fill = &fill;
            scope.spawn(move || fill(t * chunk_blocks, part));
        }
    });
    Ok(out)
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
        Self::assemble(entry, raw, kind)
    }

    /// Turns a unit's stored tensors (already on the compute device, stored dtypes) into compute
    /// tensors: floats converted to `kind`, quantized pairs dequantized under their original name.
    pub fn assemble(
        entry: &UnitEntry,
        mut raw: BTreeMap<String, Tensor>,
        kind: Kind,
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
                dequantize_cpu(q, &codes, &scales, kind)?
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

#[cfg(test)]
mod tests {
    use super::*;
    use rabbit_split::{dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4};

    fn entry(scheme: Compression, shape: Vec<usize>) -> QuantizedEntry {
        QuantizedEntry {
            name: "w".into(),
            scheme,
            block_size: 64,
            shape,
            dtype: Dtype::F32,
            codes: "w.q".into(),
            scales: "w.scale".into(),
        }
    }

    /// The libtorch dequantization equals the splitter's reference bit for bit (including a
    /// padded last block), so what streams is exactly what was quantized.
    #[test]
    fn device_dequantization_matches_the_reference() {
        let n = 64 * 5 + 17;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let (mut codes, mut scales) = (Vec::new(), Vec::new());
        quantize_nf4(&values, &mut codes, &mut scales);
        let got = dequantize(
            &entry(Compression::Nf4, vec![n]),
            &Tensor::from_slice(&codes),
            &Tensor::from_slice(&scales),
            Kind::Float,
        )
        .unwrap();
        assert_eq!(
            Vec::<f32>::try_from(got).unwrap(),
            dequantize_nf4(&codes, &scales, n)
        );

        let (mut q, mut s) = (Vec::new(), Vec::new());
        quantize_int8(&values, &mut q, &mut s);
        let got = dequantize(
            &entry(Compression::Int8, vec![n]),
            &Tensor::from_slice(&q),
            &Tensor::from_slice(&s),
            Kind::Float,
        )
        .unwrap();
        assert_eq!(
            Vec::<f32>::try_from(got).unwrap(),
            dequantize_int8(&q, &s, n)
        );

        // The CPU fast path: exact in f32, and the reference rounded once in bf16/f16.
        let cases = [
            (
                Compression::Nf4,
                Tensor::from_slice(&codes),
                Tensor::from_slice(&scales),
                dequantize_nf4(&codes, &scales, n),
            ),
            (
                Compression::Int8,
                Tensor::from_slice(&q),
                Tensor::from_slice(&s),
                dequantize_int8(&q, &s, n),
            ),
        ];
        for (scheme, codes, scales, want) in cases {
            let e = entry(scheme, vec![n]);
            let f = dequantize_cpu(&e, &codes, &scales, Kind::Float).unwrap();
            assert_eq!(Vec::<f32>::try_from(&f).unwrap(), want, "{scheme} f32");
            for kind in [Kind::BFloat16, Kind::Half] {
                let got = dequantize_cpu(&e, &codes, &scales, kind)
                    .unwrap()
                    .to_kind(Kind::Float);
                let rounded = Tensor::from_slice(&want).to_kind(kind).to_kind(Kind::Float);
                assert_eq!(
                    Vec::<f32>::try_from(&got).unwrap(),
                    Vec::<f32>::try_from(&rounded).unwrap(),
                    "{scheme} {kind:?}"
                );
            }
        }
    }
}
