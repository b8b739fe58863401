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
/// computed once in the output dtype, then every byte is two table lookups; int8 is one multiply
/// and one rounding per value. The loops are written on typed slices so they vectorize.
fn dequantize_cpu(
    q: &QuantizedEntry,
    codes: &Tensor,
    scales: &Tensor,
    kind: Kind,
    buffers: Option<&mut DequantBuffers>,
) -> Result<Tensor> {
    let numel: usize = q.shape.iter().product();
    let block = q.block_size;
    let blocks = scales.numel();
    let codes_per_block = codes_per_block(q.scheme, block);
    if codes.numel() != blocks * codes_per_block
        || numel > blocks * block
        || !block.is_multiple_of(2)
        || block == 0
    {
        return Err(CoreError::InvalidInput(format!(
            "quantized tensor `{}`: {} codes and {blocks} scales do not make {numel} values in blocks of {block}",
            q.name,
            codes.numel()
        )));
    }
    if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(CoreError::InvalidInput(format!(
            "cannot dequantize into {kind:?}"
        )));
    }
    let codes = codes.f_contiguous()?;
    let scales = scales.f_contiguous()?.f_to_kind(Kind::Float)?;
    // SAFETY: contiguous CPU tensors of the checked element counts (U8/I8 codes, F32 scales),
    // alive for this function.
    let code_bytes =
        unsafe { std::slice::from_raw_parts(codes.data_ptr() as *const u8, codes.numel()) };
    let scale_vals = unsafe { std::slice::from_raw_parts(scales.data_ptr() as *const f32, blocks) };
    let shape: Vec<i64> = q.shape.iter().map(|&d| d as i64).collect();
    let out = match buffers {
        Some(b) => b.take(&shape, kind)?,
        None => Tensor::f_empty(shape.as_slice(), (kind, Device::Cpu))?,
    };
    let src = Quantized {
        scheme: q.scheme,
        block,
        codes: code_bytes,
        scales: scale_vals,
    };
    // SAFETY: a contiguous tensor of `numel` elements of the matching width that nothing else
    // references (fresh, or returned to the pool after its layer was computed), written only here.
    unsafe {
        match kind {
            Kind::Float => src.fill_parallel(std::slice::from_raw_parts_mut(
                out.data_ptr() as *mut f32,
                numel,
            )),
            Kind::BFloat16 => src.fill_parallel(std::slice::from_raw_parts_mut(
                out.data_ptr() as *mut Bf16Bits,
                numel,
            )),
            _ => src.fill_parallel(std::slice::from_raw_parts_mut(
                out.data_ptr() as *mut half::f16,
                numel,
            )),
        }
    }
    Ok(out)
}

/// Reusable output tensors for CPU dequantization. Every streamed layer dequantizes into tensors
/// of the same few shapes; fresh allocations that large are mmapped by the allocator and
/// page-faulted in again on every layer, which costs as much as the dequantization itself. The
/// engine lends buffers out while a layer is staged and takes them back once its compute is done.
#[derive(Default)]
pub struct DequantBuffers {
    free: Vec<Tensor>,
    /// Data pointers of the buffers lent out (only those are taken back).
    lent: Vec<usize>,
}

impl DequantBuffers {
    /// A buffer of `shape`/`kind` (reused when one is free), counted as lent.
    fn take(&mut self, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let t = match self
            .free
            .iter()
            .position(|t| t.kind() == kind && t.size() == shape)
        {
            Some(i) => self.free.swap_remove(i),
            None => Tensor::f_empty(shape, (kind, Device::Cpu))?,
        };
        self.lent.push(t.data_ptr() as usize);
        Ok(t)
    }

    /// Takes back the buffers among `tensors` (a computed layer's weights, dropped by the caller
    /// otherwise); the rest (views of the layer's bytes) are simply dropped.
    pub fn reclaim(&mut self, tensors: impl IntoIterator<Item = Tensor>) {
        for t in tensors {
            let ptr = t.data_ptr() as usize;
            if let Some(i) = self.lent.iter().position(|&p| p == ptr) {
                self.lent.swap_remove(i);
                self.free.push(t);
            }
        }
    }

    /// Bytes held by free buffers.
    pub fn free_bytes(&self) -> u64 {
        self.free
            .iter()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }
}

/// An output element of CPU dequantization.
trait OutElem: Copy + Default + Send + Sync {
    fn from_f32(v: f32) -> Self;

    /// Fills the leading full NF4 blocks of `out` with a vectorized kernel where this type has
    /// one; returns how many blocks it filled (the rest take the portable loop).
    fn nf4_fast(_codes: &[u8], _scales: &[f32], _block: usize, _out: &mut [Self]) -> usize {
        0
    }

    /// The same for int8 blocks.
    fn int8_fast(_codes: &[u8], _scales: &[f32], _block: usize, _out: &mut [Self]) -> usize {
        0
    }
}

impl OutElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// bf16 as its bits, rounded to nearest even (the values are finite: codes times a finite
/// scale), written branch-free so the int8 loop vectorizes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Bf16Bits(u16);

impl OutElem for Bf16Bits {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let b = v.to_bits();
        Bf16Bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
    }

    fn nf4_fast(codes: &[u8], scales: &[f32], block: usize, out: &mut [Self]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if block.is_multiple_of(32)
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
        {
            let blocks = (out.len() / block)
                .min(scales.len())
                .min(codes.len() / (block / 2));
            // SAFETY: the features were detected; `blocks` full blocks of codes, scales and
            // output exist (checked just above).
            unsafe { nf4_bf16_sse(codes, scales, block, blocks, out.as_mut_ptr() as *mut u16) };
            return blocks;
        }
        let _ = (codes, scales, block, out);
        0
    }

    fn int8_fast(codes: &[u8], scales: &[f32], block: usize, out: &mut [Self]) -> usize {
        #[cfg(target_arch = "x86_64")]
        if block.is_multiple_of(16) && std::arch::is_x86_feature_detected!("sse4.1") {
            let blocks = (out.len() / block)
                .min(scales.len())
                .min(codes.len() / block);
            // SAFETY: the feature was detected; `blocks` full blocks of codes, scales and output
            // exist (checked just above).
            unsafe { int8_bf16_sse(codes, scales, block, blocks, out.as_mut_ptr() as *mut u16) };
            return blocks;
        }
        let _ = (codes, scales, block, out);
        0
    }
}

/// Rounds four f32 lanes to bf16 bits (in the low half of each 32-bit lane), exactly like
/// [`Bf16Bits::from_f32`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn bf16_round_sse(v: std::arch::x86_64::__m128) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let i = _mm_castps_si128(v);
    let lsb = _mm_and_si128(_mm_srli_epi32(i, 16), _mm_set1_epi32(1));
    _mm_srli_epi32(
        _mm_add_epi32(_mm_add_epi32(i, _mm_set1_epi32(0x7fff)), lsb),
        16,
    )
}

/// int8 → bf16 for `blocks` full blocks, 16 codes per step: sign-extend, convert, scale, round.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn int8_bf16_sse(codes: &[u8], scales: &[f32], block: usize, blocks: usize, out: *mut u16) {
    use std::arch::x86_64::*;
    for b in 0..blocks {
        let s = _mm_set1_ps(*scales.get_unchecked(b));
        let src = codes.as_ptr().add(b * block);
        let dst = out.add(b * block);
        for j in (0..block).step_by(16) {
            let x = _mm_loadu_si128(src.add(j) as *const __m128i);
            let quarter = |g: __m128i| bf16_round_sse(_mm_mul_ps(_mm_cvtepi32_ps(g), s));
            let q0 = quarter(_mm_cvtepi8_epi32(x));
            let q1 = quarter(_mm_cvtepi8_epi32(_mm_srli_si128(x, 4)));
            let q2 = quarter(_mm_cvtepi8_epi32(_mm_srli_si128(x, 8)));
            let q3 = quarter(_mm_cvtepi8_epi32(_mm_srli_si128(x, 12)));
            _mm_storeu_si128(dst.add(j) as *mut __m128i, _mm_packus_epi32(q0, q1));
            _mm_storeu_si128(dst.add(j + 8) as *mut __m128i, _mm_packus_epi32(q2, q3));
        }
    }
}

/// NF4 → bf16 for `blocks` full blocks, 16 code bytes (32 values) per step: the block's 16
/// scaled codebook values are rounded to bf16 once and split into a low-byte and a high-byte
/// table, so each lookup is one `pshufb`; the results are interleaved back into bf16 words in
/// the stored order (low nibble first). Rounds exactly like [`Bf16Bits::from_f32`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
unsafe fn nf4_bf16_sse(codes: &[u8], scales: &[f32], block: usize, blocks: usize, out: *mut u16) {
    use std::arch::x86_64::*;
    let cpb = block / 2;
    let book = [
        _mm_loadu_ps(NF4_CODEBOOK.as_ptr()),
        _mm_loadu_ps(NF4_CODEBOOK.as_ptr().add(4)),
        _mm_loadu_ps(NF4_CODEBOOK.as_ptr().add(8)),
        _mm_loadu_ps(NF4_CODEBOOK.as_ptr().add(12)),
    ];
    let nibble = _mm_set1_epi8(0x0f);
    // Even bytes (low halves of 8 words) to the low 8 lanes, odd bytes to the high 8.
    let split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for b in 0..blocks {
        let s = _mm_set1_ps(*scales.get_unchecked(b));
        let mut bits = [_mm_setzero_si128(); 4];
        for (k, word) in bits.iter_mut().enumerate() {
            *word = bf16_round_sse(_mm_mul_ps(book[k], s));
        }
        let a = _mm_shuffle_epi8(_mm_packus_epi32(bits[0], bits[1]), split);
        let c = _mm_shuffle_epi8(_mm_packus_epi32(bits[2], bits[3]), split);
        let tab_lo = _mm_unpacklo_epi64(a, c);
        let tab_hi = _mm_unpackhi_epi64(a, c);
        let src = codes.as_ptr().add(b * cpb);
        let dst = out.add(b * block);
        for j in (0..cpb).step_by(16) {
            let x = _mm_loadu_si128(src.add(j) as *const __m128i);
            let lo = _mm_and_si128(x, nibble);
            let hi = _mm_and_si128(_mm_srli_epi16(x, 4), nibble);
            let (llo, hlo) = (_mm_shuffle_epi8(tab_lo, lo), _mm_shuffle_epi8(tab_hi, lo));
            let (lhi, hhi) = (_mm_shuffle_epi8(tab_lo, hi), _mm_shuffle_epi8(tab_hi, hi));
            let first = _mm_unpacklo_epi8(llo, hlo); // table[lo] of bytes 0..8
            let second = _mm_unpackhi_epi8(llo, hlo); // bytes 8..16
            let first_hi = _mm_unpacklo_epi8(lhi, hhi); // table[hi] of bytes 0..8
            let second_hi = _mm_unpackhi_epi8(lhi, hhi);
            let o = dst.add(2 * j) as *mut __m128i;
            _mm_storeu_si128(o, _mm_unpacklo_epi16(first, first_hi));
            _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(first, first_hi));
            _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(second, second_hi));
            _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(second, second_hi));
        }
    }
}

impl OutElem for half::f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// Code bytes per block: NF4 packs two values per byte, int8 stores one.
fn codes_per_block(scheme: Compression, block: usize) -> usize {
    match scheme {
        Compression::Nf4 => block / 2,
        Compression::Int8 => block,
    }
}

/// The stored form of one quantized tensor, borrowed.
struct Quantized<'a> {
    scheme: Compression,
    block: usize,
    codes: &'a [u8],
    scales: &'a [f32],
}

impl Quantized<'_> {
    fn codes_per_block(&self) -> usize {
        codes_per_block(self.scheme, self.block)
    }

    /// Fills `out` (the first `out.len()` values) on up to 8 threads, split on block boundaries.
    fn fill_parallel<T: OutElem>(&self, out: &mut [T]) {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8);
        let blocks = out.len().div_ceil(self.block);
        let chunk_blocks = blocks.div_ceil(threads).max(1);
        let cpb = self.codes_per_block();
        if threads == 1 || blocks < 2 * threads {
            return self.fill(out);
        }
        std::thread::scope(|scope| {
            for (t, part) in out.chunks_mut(chunk_blocks * self.block).enumerate() {
                let first = t * chunk_blocks;
                let sub = Quantized {
                    scheme: self.scheme,
                    block: self.block,
                    codes: &self.codes[first * cpb..],
                    scales: &self.scales[first..],
                };
                scope.spawn(move || sub.fill(part));
            }
        });
    }

    /// Fills `out` from the first block on.
    fn fill<T: OutElem>(&self, out: &mut [T]) {
        let block = self.block;
        let codes = self.codes.chunks_exact(self.codes_per_block());
        let scales = self.scales;
        match self.scheme {
            Compression::Nf4 => {
                let done = T::nf4_fast(self.codes, scales, block, out);
                let out = &mut out[done * block..];
                let (codes, scales) = (codes.skip(done), &scales[done..]);
                for ((o, c), &s) in out.chunks_mut(block).zip(codes).zip(scales) {
                    let table: [T; 16] = std::array::from_fn(|k| T::from_f32(NF4_CODEBOOK[k] * s));
                    if o.len() == block {
                        for (pair, &byte) in o.chunks_exact_mut(2).zip(c) {
                            pair[0] = table[(byte & 0x0f) as usize];
                            pair[1] = table[(byte >> 4) as usize];
                        }
                    } else {
                        // The last, partial block.
                        for (i, v) in o.iter_mut().enumerate() {
                            let byte = c[i / 2];
                            let nib = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                            *v = table[nib as usize];
                        }
                    }
                }
            }
            Compression::Int8 => {
                let done = T::int8_fast(self.codes, scales, block, out);
                let out = &mut out[done * block..];
                let (codes, scales) = (codes.skip(done), &scales[done..]);
                for ((o, c), &s) in out.chunks_mut(block).zip(codes).zip(scales) {
                    for (v, &byte) in o.iter_mut().zip(c) {
                        *v = T::from_f32(byte as i8 as f32 * s);
                    }
                }
            }
        }
    }
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
            check_cpu(scheme, n, &codes, &scales, &want);
        }

        // Large enough for the threaded and vectorized paths, with a partial last block.
        let n = 64 * 1000 + 33;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (0.01 + (i % 97) as f32))
            .collect();
        let (mut codes, mut scales) = (Vec::new(), Vec::new());
        quantize_nf4(&values, &mut codes, &mut scales);
        let want = dequantize_nf4(&codes, &scales, n);
        let (codes, scales) = (Tensor::from_slice(&codes), Tensor::from_slice(&scales));
        check_cpu(Compression::Nf4, n, &codes, &scales, &want);
        let (mut q, mut s) = (Vec::new(), Vec::new());
        quantize_int8(&values, &mut q, &mut s);
        let want = dequantize_int8(&q, &s, n);
        check_cpu(
            Compression::Int8,
            n,
            &Tensor::from_slice(&q),
            &Tensor::from_slice(&s),
            &want,
        );
    }

    /// Buffers lent for a layer come back and are reused for the next one, and only they do.
    #[test]
    fn dequant_buffers_are_reused() {
        let n = 64 * 300;
        let values: Vec<f32> = (0..n).map(|i| (i % 37) as f32 - 18.0).collect();
        let (mut codes, mut scales) = (Vec::new(), Vec::new());
        quantize_nf4(&values, &mut codes, &mut scales);
        let want = dequantize_nf4(&codes, &scales, n);
        let (codes, scales) = (Tensor::from_slice(&codes), Tensor::from_slice(&scales));
        let e = entry(Compression::Nf4, vec![n / 64, 64]);
        let mut pool = DequantBuffers::default();
        let first = dequantize_cpu(&e, &codes, &scales, Kind::Float, Some(&mut pool)).unwrap();
        let ptr = first.data_ptr();
        let stranger = Tensor::zeros([n as i64 / 64, 64], (Kind::Float, Device::Cpu));
        pool.reclaim([first, stranger]);
        assert_eq!(
            pool.free_bytes(),
            (n * 4) as u64,
            "only the lent buffer is kept"
        );
        let again = dequantize_cpu(&e, &codes, &scales, Kind::Float, Some(&mut pool)).unwrap();
        assert_eq!(again.data_ptr(), ptr, "the buffer is reused");
        assert_eq!(pool.free_bytes(), 0);
        assert_eq!(Vec::<f32>::try_from(again.view([-1])).unwrap(), want);
        // Another shape or dtype gets its own buffer.
        let other = dequantize_cpu(&e, &codes, &scales, Kind::BFloat16, Some(&mut pool)).unwrap();
        assert_ne!(other.data_ptr(), ptr);
    }

    /// The CPU path is exact in f32 and equals the reference rounded once in bf16/f16.
    fn check_cpu(scheme: Compression, n: usize, codes: &Tensor, scales: &Tensor, want: &[f32]) {
        let e = entry(scheme, vec![n]);
        let f = dequantize_cpu(&e, codes, scales, Kind::Float, None).unwrap();
        assert_eq!(Vec::<f32>::try_from(&f).unwrap(), want, "{scheme} f32");
        for kind in [Kind::BFloat16, Kind::Half] {
            let got = dequantize_cpu(&e, codes, scales, kind, None)
                .unwrap()
                .to_kind(Kind::Float);
            let rounded = Tensor::from_slice(want).to_kind(kind).to_kind(Kind::Float);
            assert_eq!(
                Vec::<f32>::try_from(&got).unwrap(),
                Vec::<f32>::try_from(&rounded).unwrap(),
                "{scheme} {kind:?}"
            );
        }
    }
}
