//! Expanding block-wise compressed tensors (NF4, int8; one f32 absmax scale per block) into the
//! compute dtype: with libtorch ops on a device, and on the CPU straight into reused output
//! buffers, on the intra-op threads, with SSE kernels for bf16 where the CPU has them.

use rabbit_split::manifest::QuantizedEntry;
use rabbit_split::{Compression, NF4_CODEBOOK};
use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};

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

/// CPU dequantization written directly into the output tensor's memory, on the intra-op
/// threads: libtorch ops would materialise int64 indices and f32 temporaries several times the
/// layer's size, which is slower than reading the uncompressed layer. Per block, the 16 (NF4)
/// scaled values are computed once in the output dtype, then every byte is two table lookups;
/// int8 is one multiply and one rounding per value. The loops are written on typed slices so
/// they vectorize.
pub(crate) fn dequantize_cpu(
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
        Bf16Bits((crate::qgemv::bf16_round(v).to_bits() >> 16) as u16)
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
            unsafe {
                crate::dequant_x86::nf4_bf16_sse(
                    codes,
                    scales,
                    block,
                    blocks,
                    out.as_mut_ptr() as *mut u16,
                )
            };
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
            unsafe {
                crate::dequant_x86::int8_bf16_sse(
                    codes,
                    scales,
                    block,
                    blocks,
                    out.as_mut_ptr() as *mut u16,
                )
            };
            return blocks;
        }
        let _ = (codes, scales, block, out);
        0
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

    /// Fills `out` (the first `out.len()` values) in one chunk per intra-op thread (at most
    /// 8: the work is memory-bound), split on block boundaries, on libtorch's own OpenMP team
    /// ([`crate::omp`]: a second pool would share the cores with its spinning threads).
    fn fill_parallel<T: OutElem>(&self, out: &mut [T]) {
        let threads = (tch::get_num_threads().max(1) as usize).min(8);
        let blocks = out.len().div_ceil(self.block);
        if threads == 1 || blocks < 2 * threads {
            return self.fill(out);
        }
        let len = out.len();
        let dst = crate::omp::SharedMut::new(out);
        let cpb = self.codes_per_block();
        crate::omp::parallel(threads, &|part, parts| {
            let chunk_blocks = blocks.div_ceil(parts);
            let first = part * chunk_blocks;
            let start = (first * self.block).min(len);
            let end = ((first + chunk_blocks) * self.block).min(len);
            if start == end {
                return;
            }
            // SAFETY: each part writes its own block range of `out`, which outlives the region.
            let part_out = unsafe { dst.slice(start, end - start) };
            Quantized {
                scheme: self.scheme,
                block: self.block,
                codes: &self.codes[first * cpb..],
                scales: &self.scales[first..],
            }
            .fill(part_out);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rabbit_split::dtype::Dtype;
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
