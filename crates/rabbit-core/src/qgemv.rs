//! Compressed weights used as they are stored: `x · Wᵀ` for a few rows of `x` (decode steps,
//! small batches, a few drafts) straight from the NF4/int8 codes and their block scales, with no
//! dequantized copy of the weight ever written.
//!
//! Why: on the CPU a decode step is a matrix-vector product, bound by the bytes it reads.
//! Dequantizing a streamed layer first writes the bf16 weight (2 bytes per value) and the GEMV
//! then reads it back: 4bit decoded 2× slower than bf16 from the page cache. Here each block's
//! 16 codebook values (NF4) or its scale (int8) are applied in registers, so a step reads 0.5
//! (NF4) or 1 (int8) byte per weight.
//!
//! Numerics: every weight is the value [`crate::dequant`] would have written (rounded to the
//! compute dtype the same way), multiplied by `x` and accumulated in f32, the output rounded to
//! the compute dtype once, bias added before that rounding: what libtorch's bf16/f32 linear does
//! with the dequantized weight, up to the order of the f32 additions.

use rabbit_split::manifest::QuantizedEntry;
use rabbit_split::{Compression, NF4_CODEBOOK};
use tch::{Device, Kind, Tensor};

use crate::dequant::dequantize_cpu;
use crate::error::{CoreError, Result};

/// The kernel that applies packed weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 16 lanes (x86-64 with AVX-512F).
    Avx512,
    /// 8 lanes (x86-64 with AVX2 and FMA).
    Avx2,
    /// Plain loops: the kernels' reference, slower than dequantizing and calling the BLAS.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs, or the one `RABBIT_PACKED_KERNEL` names (`avx512`,
    /// `avx2`, `off`: dequantize as before) when this CPU runs it: for benchmarks comparing them.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Kernel::available();
            let asked = match std::env::var("RABBIT_PACKED_KERNEL").as_deref() {
                Ok("avx512") => Some(Kernel::Avx512),
                Ok("avx2") => Some(Kernel::Avx2),
                Ok("off") => Some(Kernel::Portable),
                _ => None,
            };
            match asked {
                Some(k) if all.contains(&k) => k,
                _ => all[0],
            }
        })
    }

    /// Every kernel this CPU runs, fastest first (the portable one last).
    pub fn available() -> Vec<Kernel> {
        let mut k = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                k.push(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                k.push(Kernel::Avx2);
            }
        }
        k.push(Kernel::Portable);
        k
    }
}

/// Whether this CPU has a vectorized kernel (AVX-512F, or AVX2 with FMA). Elsewhere weights are
/// not kept packed: the portable loop would be slower than dequantizing once and calling the
/// BLAS.
pub fn direct_available() -> bool {
    Kernel::best() != Kernel::Portable
}

/// Rows of `x` up to which a packed weight is applied directly; more rows (a prefill chunk) are
/// a matrix product, where dequantizing once and calling the BLAS wins.
pub const MAX_DIRECT_ROWS: usize = 8;

/// A compressed `[out, in]` weight kept as stored: codes (CPU, contiguous) and f32 block scales.
pub struct PackedWeight {
    entry: QuantizedEntry,
    codes: Tensor,
    scales: Tensor,
    /// Compute dtype (what the dequantized weight would be).
    kind: Kind,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Keeps `codes`/`scales` of `q` packed when this module can apply them: a 2-D weight on the
    /// CPU whose rows hold whole blocks (of a multiple of 32 values), computed in f32 or bf16.
    /// `None` otherwise (the caller dequantizes as before). Callers check
    /// [`direct_available`] first.
    pub fn new(q: &QuantizedEntry, codes: &Tensor, scales: &Tensor, kind: Kind) -> Option<Self> {
        let [n, k] = q.shape[..] else { return None };
        let block = q.block_size;
        let per_block = match q.scheme {
            Compression::Nf4 => block / 2,
            Compression::Int8 => block,
        };
        let ok = codes.device() == Device::Cpu
            && matches!(kind, Kind::Float | Kind::BFloat16)
            && block > 0
            && block.is_multiple_of(32)
            && k.is_multiple_of(block)
            && n > 0
            && codes.numel() == n * k / block * per_block
            && scales.numel() == n * k / block
            && matches!(codes.kind(), Kind::Uint8 | Kind::Int8);
        if !ok {
            return None;
        }
        let codes = codes.f_contiguous().ok()?;
        let scales = scales.f_to_kind(Kind::Float).ok()?.f_contiguous().ok()?;
        Some(PackedWeight {
            entry: q.clone(),
            codes,
            scales,
            kind,
            n,
            k,
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// The weight dequantized into the compute dtype (a fresh tensor).
    pub fn dequantize(&self) -> Result<Tensor> {
        dequantize_cpu(&self.entry, &self.codes, &self.scales, self.kind, None)
    }

    /// `x · Wᵀ + b` for `x` `[…, in]`: directly from the codes for up to [`MAX_DIRECT_ROWS`]
    /// rows, through a dequantized copy for more.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut shape = x.size();
        let k = *shape.last().unwrap_or(&0) as usize;
        if k != self.k {
            return Err(CoreError::InvalidInput(format!(
                "`{}`: input width {k}, the weight takes {}",
                self.entry.name, self.k
            )));
        }
        let rows = x.numel() / k.max(1);
        if rows == 0 || rows > MAX_DIRECT_ROWS || x.kind() != self.kind {
            return Ok(x.f_linear(&self.dequantize()?, bias)?);
        }
        let xf = x
            .f_reshape([rows as i64, k as i64])?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        // SAFETY: a contiguous f32 CPU tensor of rows × k values, alive for this function.
        let xs = unsafe { std::slice::from_raw_parts(xf.data_ptr() as *const f32, rows * k) };
        let bias_f = match bias {
            Some(b) if b.numel() != self.n => {
                return Err(CoreError::InvalidInput(format!(
                    "`{}`: bias of {} values for {} outputs",
                    self.entry.name,
                    b.numel(),
                    self.n
                )))
            }
            Some(b) => Some(b.f_to_kind(Kind::Float)?.f_contiguous()?),
            None => None,
        };
        // SAFETY: a contiguous f32 CPU tensor of `n` values (checked just above).
        let bs = bias_f
            .as_ref()
            .map(|b| unsafe { std::slice::from_raw_parts(b.data_ptr() as *const f32, self.n) });
        // SAFETY: contiguous tensors of the element counts `new` checked.
        let codes = unsafe {
            std::slice::from_raw_parts(self.codes.data_ptr() as *const u8, self.codes.numel())
        };
        let scales = unsafe {
            std::slice::from_raw_parts(self.scales.data_ptr() as *const f32, self.scales.numel())
        };
        let w = Packed {
            scheme: self.entry.scheme,
            block: self.entry.block_size,
            k: self.k,
            codes,
            scales,
            bf16: self.kind == Kind::BFloat16,
        };
        let out = w.apply(xs, rows, self.n, bs, Kernel::best());
        shape.pop();
        shape.push(self.n as i64);
        Ok(Tensor::f_from_slice(&out)?
            .f_view(shape.as_slice())?
            .f_to_kind(self.kind)?)
    }
}

/// A packed weight borrowed as slices.
#[derive(Clone, Copy)]
pub(crate) struct Packed<'a> {
    pub(crate) scheme: Compression,
    pub(crate) block: usize,
    pub(crate) k: usize,
    pub(crate) codes: &'a [u8],
    pub(crate) scales: &'a [f32],
    /// Round each weight to bf16 (the compute dtype) before use.
    pub(crate) bf16: bool,
}

impl Packed<'_> {
    fn code_bytes_per_row(&self) -> usize {
        match self.scheme {
            Compression::Nf4 => self.k / 2,
            Compression::Int8 => self.k,
        }
    }

    /// `rows × n` f32 outputs (row-major) for `rows` rows of `x` (`rows × k`, row-major), with
    /// `kernel` (one of [`Kernel::available`]).
    fn apply(
        &self,
        x: &[f32],
        rows: usize,
        n: usize,
        bias: Option<&[f32]>,
        kernel: Kernel,
    ) -> Vec<f32> {
        // NF4 bytes hold values 2j (low nibble) and 2j + 1 (high): with x split into its even
        // and odd positions, each nibble meets its input without shuffling the weights.
        let (xa, xb) = match self.scheme {
            Compression::Nf4 => {
                let half = self.k / 2;
                let mut even = vec![0f32; rows * half];
                let mut odd = vec![0f32; rows * half];
                for r in 0..rows {
                    for j in 0..half {
                        even[r * half + j] = x[r * self.k + 2 * j];
                        odd[r * half + j] = x[r * self.k + 2 * j + 1];
                    }
                }
                (even, odd)
            }
            Compression::Int8 => (Vec::new(), Vec::new()),
        };
        let (xa, xb): (&[f32], &[f32]) = match self.scheme {
            Compression::Nf4 => (&xa, &xb),
            Compression::Int8 => (x, &[]),
        };
        // Outputs in [n, rows] order: each output's rows are one contiguous range.
        let mut out_t = vec![0f32; n * rows];
        let dst = crate::omp::SharedMut::new(&mut out_t);
        // On libtorch's own threads, as many as the thread governor uses; outputs are taken in
        // chunks from a shared counter, so a thread that was preempted does not hold up the
        // others.
        let threads = tch::get_num_threads().max(1) as usize;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let chunk = (n / (threads * 8)).clamp(8, 256);
        crate::omp::parallel(threads, &|_, _| loop {
            let lo = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
            if lo >= n {
                break;
            }
            for j in lo..(lo + chunk).min(n) {
                // SAFETY: output j's `rows` values, written by the one thread that took j.
                let o = unsafe { dst.slice(j * rows, rows) };
                self.row(j, xa, xb, rows, o, kernel);
            }
        });
        let mut out = vec![0f32; rows * n];
        for j in 0..n {
            let b = bias.map_or(0.0, |b| b[j]);
            for r in 0..rows {
                out[r * n + j] = out_t[j * rows + r] + b;
            }
        }
        out
    }

    /// Output `j` for every row: `out[r] = Σ_k x[r, k] · w[j, k]`.
    fn row(&self, j: usize, xa: &[f32], xb: &[f32], rows: usize, out: &mut [f32], kernel: Kernel) {
        let cpr = self.code_bytes_per_row();
        let bpr = self.k / self.block;
        let codes = &self.codes[j * cpr..(j + 1) * cpr];
        let scales = &self.scales[j * bpr..(j + 1) * bpr];
        #[cfg(target_arch = "x86_64")]
        {
            use crate::qgemv_x86 as x86;
            let (block, bf16, half, k) = (self.block, self.bf16, self.k / 2, self.k);
            // SAFETY: `kernel` is one of Kernel::available (its features were detected); the
            // slices hold one row's whole blocks and `rows` (1..=8) rows of the (split) input,
            // as `apply` built them.
            unsafe {
                match (kernel, self.scheme) {
                    (Kernel::Avx512, Compression::Nf4) => {
                        return x86::nf4_row(codes, scales, block, bf16, xa, xb, half, rows, out)
                    }
                    (Kernel::Avx512, Compression::Int8) => {
                        return x86::int8_row(codes, scales, block, bf16, xa, k, rows, out)
                    }
                    (Kernel::Avx2, Compression::Nf4) => {
                        return x86::nf4_row_avx2(
                            codes, scales, block, bf16, xa, xb, half, rows, out,
                        )
                    }
                    (Kernel::Avx2, Compression::Int8) => {
                        return x86::int8_row_avx2(codes, scales, block, bf16, xa, k, rows, out)
                    }
                    (Kernel::Portable, _) => {}
                }
            }
        }
        self.row_portable(codes, scales, xa, xb, rows, out);
    }

    fn row_portable(
        &self,
        codes: &[u8],
        scales: &[f32],
        xa: &[f32],
        xb: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        let round = |v: f32| if self.bf16 { bf16_round(v) } else { v };
        out.iter_mut().for_each(|o| *o = 0.0);
        match self.scheme {
            Compression::Nf4 => {
                let half = self.k / 2;
                let cpb = self.block / 2;
                for (b, (c, &s)) in codes.chunks_exact(cpb).zip(scales).enumerate() {
                    let table: [f32; 16] = std::array::from_fn(|i| round(NF4_CODEBOOK[i] * s));
                    for (r, o) in out.iter_mut().enumerate().take(rows) {
                        let e = &xa[r * half + b * cpb..][..cpb];
                        let od = &xb[r * half + b * cpb..][..cpb];
                        let mut acc = 0f32;
                        for ((&byte, &xe), &xo) in c.iter().zip(e).zip(od) {
                            acc += table[(byte & 0x0f) as usize] * xe
                                + table[(byte >> 4) as usize] * xo;
                        }
                        *o += acc;
                    }
                }
            }
            Compression::Int8 => {
                for (b, (c, &s)) in codes.chunks_exact(self.block).zip(scales).enumerate() {
                    for (r, o) in out.iter_mut().enumerate().take(rows) {
                        let xs = &xa[r * self.k + b * self.block..][..self.block];
                        let mut acc = 0f32;
                        for (&byte, &x) in c.iter().zip(xs) {
                            acc += round(byte as i8 as f32 * s) * x;
                        }
                        *o += acc;
                    }
                }
            }
        }
    }
}

/// f32 rounded to the nearest bf16 (ties to even), as f32: what `dequant` writes.
#[inline(always)]
pub(crate) fn bf16_round(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits(((b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rabbit_split::dtype::Dtype;
    use rabbit_split::{quantize_int8, quantize_nf4};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i * 2654435761 + seed * 40503) % 100_003;
                (h as f32 / 50_000.0 - 1.0) * (1.0 + (i % 7) as f32 * 0.3)
            })
            .collect()
    }

    fn packed(scheme: Compression, n: usize, k: usize, kind: Kind) -> PackedWeight {
        let w = values(n * k, 1);
        let (mut codes, mut scales) = (Vec::<u8>::new(), Vec::new());
        match scheme {
            Compression::Nf4 => quantize_nf4(&w, &mut codes, &mut scales),
            Compression::Int8 => {
                let mut signed = Vec::new();
                quantize_int8(&w, &mut signed, &mut scales);
                codes = signed.into_iter().map(|c| c as u8).collect();
            }
        }
        let entry = QuantizedEntry {
            name: "w".into(),
            scheme,
            block_size: 64,
            shape: vec![n, k],
            dtype: Dtype::F32,
            codes: "w.q".into(),
            scales: "w.scale".into(),
        };
        let codes = Tensor::from_slice(&codes);
        let scales = Tensor::from_slice(&scales);
        PackedWeight::new(&entry, &codes, &scales, kind).expect("packable")
    }

    /// Direct application equals the dequantized weight through libtorch's linear: to f32
    /// rounding in f32, and to one bf16 step in bf16 (the output rounding of sums that differ
    /// only in their order), for 1..=8 rows, with and without bias, on every kernel this CPU
    /// runs (against the portable loop).
    #[test]
    fn direct_equals_dequantize_then_linear() {
        for scheme in [Compression::Nf4, Compression::Int8] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let (n, k) = (37, 192);
                let p = packed(scheme, n, k, kind);
                let dense = p.dequantize().unwrap();
                let bias = Tensor::from_slice(&values(n, 9)).to_kind(kind);
                for rows in [1usize, 2, 3, 5, 8] {
                    let x = Tensor::from_slice(&values(rows * k, rows + 2))
                        .view([rows as i64, k as i64])
                        .to_kind(kind);
                    for b in [None, Some(&bias)] {
                        let want = x.linear(&dense, b).to_kind(Kind::Float);
                        let got = p.linear(&x, b).unwrap();
                        assert_eq!(got.size(), want.size());
                        assert_eq!(got.kind(), kind);
                        let got = got.to_kind(Kind::Float);
                        let scale = want.abs().max().double_value(&[]).max(1.0);
                        let diff = (&got - &want).abs().max().double_value(&[]);
                        let tol = if kind == Kind::Float {
                            1e-5
                        } else {
                            1.0 / 128.0
                        };
                        assert!(
                            diff <= tol * scale,
                            "{scheme:?} {kind:?} rows {rows} bias {}: {diff}",
                            b.is_some()
                        );
                    }
                    let xf = x.to_kind(Kind::Float).contiguous();
                    let xs: Vec<f32> = Vec::<f32>::try_from(xf.view([-1])).unwrap();
                    let codes: Vec<u8> = Vec::<u8>::try_from(p.codes.to_kind(Kind::Uint8)).unwrap();
                    let scales: Vec<f32> = Vec::<f32>::try_from(&p.scales).unwrap();
                    let w = Packed {
                        scheme,
                        block: 64,
                        k,
                        codes: &codes,
                        scales: &scales,
                        bf16: kind == Kind::BFloat16,
                    };
                    // Every kernel this CPU has computes the portable loop's sums.
                    let (xa, xb): (Vec<f32>, Vec<f32>) = match scheme {
                        Compression::Nf4 => (
                            (0..rows * k / 2)
                                .map(|i| xs[(i / (k / 2)) * k + 2 * (i % (k / 2))])
                                .collect(),
                            (0..rows * k / 2)
                                .map(|i| xs[(i / (k / 2)) * k + 2 * (i % (k / 2)) + 1])
                                .collect(),
                        ),
                        Compression::Int8 => (xs.clone(), Vec::new()),
                    };
                    let cpr = w.code_bytes_per_row();
                    let reference: Vec<Vec<f32>> = (0..n)
                        .map(|j| {
                            let mut o = vec![0f32; rows];
                            w.row_portable(
                                &codes[j * cpr..(j + 1) * cpr],
                                &scales[j * (k / 64)..(j + 1) * (k / 64)],
                                &xa,
                                &xb,
                                rows,
                                &mut o,
                            );
                            o
                        })
                        .collect();
                    for kernel in Kernel::available() {
                        let fast = w.apply(&xs, rows, n, None, kernel);
                        for (j, want) in reference.iter().enumerate() {
                            for r in 0..rows {
                                let f = fast[r * n + j];
                                assert!(
                                    (want[r] - f).abs() <= 1e-4 * f.abs().max(1.0),
                                    "{kernel:?} {scheme:?} {kind:?} row {r} out {j}: {} vs {f}",
                                    want[r]
                                );
                            }
                        }
                    }
                }
                // More rows than the direct path takes: through the dequantized weight, exactly.
                let x = Tensor::from_slice(&values(9 * k, 3))
                    .view([9, k as i64])
                    .to_kind(kind);
                let want = x.linear(&dense, Some(&bias));
                let got = p.linear(&x, Some(&bias)).unwrap();
                assert!(got.equal(&want), "{scheme:?} {kind:?}: 9 rows");
            }
        }
    }

    #[test]
    fn leading_dimensions_are_kept_and_bad_widths_refused() {
        let p = packed(Compression::Nf4, 16, 128, Kind::Float);
        let x = Tensor::from_slice(&values(2 * 128, 5)).view([1, 2, 128]);
        assert_eq!(p.linear(&x, None).unwrap().size(), vec![1, 2, 16]);
        let bad = Tensor::zeros([1, 64], (Kind::Float, Device::Cpu));
        let e = p.linear(&bad, None).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("64"), "{e}");
    }

    #[test]
    fn unpackable_weights_are_left_to_dequantization() {
        let q = |shape: Vec<usize>, block: usize| QuantizedEntry {
            name: "w".into(),
            scheme: Compression::Nf4,
            block_size: block,
            shape,
            dtype: Dtype::F32,
            codes: "w.q".into(),
            scales: "w.scale".into(),
        };
        let codes = Tensor::zeros([64], (Kind::Uint8, Device::Cpu));
        let scales = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert!(PackedWeight::new(&q(vec![2, 64], 64), &codes, &scales, Kind::Float).is_some());
        // Blocks across rows, 1-D, f16, wrong counts.
        assert!(PackedWeight::new(&q(vec![4, 32], 64), &codes, &scales, Kind::Float).is_none());
        assert!(PackedWeight::new(&q(vec![128], 64), &codes, &scales, Kind::Float).is_none());
        assert!(PackedWeight::new(&q(vec![2, 64], 64), &codes, &scales, Kind::Half).is_none());
        assert!(PackedWeight::new(&q(vec![3, 64], 64), &codes, &scales, Kind::Float).is_none());
    }
}
