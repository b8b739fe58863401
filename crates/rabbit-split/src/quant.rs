//! Block-wise weight compression applied at split time: NF4 (4-bit NormalFloat codebook, as in
//! bitsandbytes / QLoRA, without double quantization) and symmetric INT8, both with one `f32`
//! scale per block of [`QUANT_BLOCK`] consecutive elements (row-major order of the tensor).
//!
//! The quantizers are deterministic and defined exactly (docs/FORMAT.md, "Compressed splits"),
//! so a reader can dequantize without this crate; [`dequantize_nf4`] and [`dequantize_int8`] are
//! the reference.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;

/// A split-time weight compression scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// 4-bit NormalFloat: per-block absmax, codes index [`NF4_CODEBOOK`], two codes per byte.
    Nf4,
    /// Symmetric 8-bit integers: per-block scale `absmax / 127`, codes in `[-127, 127]`.
    Int8,
}

/// Elements per quantization block (both schemes).
pub const QUANT_BLOCK: usize = 64;

/// The 16 NF4 code values (ascending; index 7 is exactly 0), verbatim from bitsandbytes.
#[allow(clippy::excessive_precision)]
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// NF4 code of the value 0 (used for padding and all-zero blocks).
const NF4_ZERO: u8 = 7;

impl Compression {
    /// The label used on the command line and in `manifest.json` `options` (`4bit`, `8bit`).
    pub fn label(&self) -> &'static str {
        match self {
            Compression::Nf4 => "4bit",
            Compression::Int8 => "8bit",
        }
    }

    /// Dtype of the codes tensor (`W.q`): `U8` for NF4 (packed pairs), `I8` for INT8.
    pub fn codes_dtype(&self) -> Dtype {
        match self {
            Compression::Nf4 => Dtype::U8,
            Compression::Int8 => Dtype::I8,
        }
    }

    /// Shape (`[len]`) of the codes tensor for a tensor of `numel` elements.
    pub fn codes_len(&self, numel: usize) -> usize {
        let padded = numel.div_ceil(QUANT_BLOCK) * QUANT_BLOCK;
        match self {
            Compression::Nf4 => padded / 2,
            Compression::Int8 => padded,
        }
    }

    /// Number of blocks (and `f32` scales) for a tensor of `numel` elements.
    pub fn num_blocks(numel: usize) -> usize {
        numel.div_ceil(QUANT_BLOCK)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Error of [`Compression::from_str`]: carries the unrecognised string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseCompressionError(pub String);

impl fmt::Display for ParseCompressionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown compression {:?}; accepted: 4bit (or nf4), 8bit (or int8)",
            self.0
        )
    }
}

impl std::error::Error for ParseCompressionError {}

impl FromStr for Compression {
    type Err = ParseCompressionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "4bit" | "nf4" => Ok(Compression::Nf4),
            "8bit" | "int8" => Ok(Compression::Int8),
            _ => Err(ParseCompressionError(s.to_string())),
        }
    }
}

/// Serde helper for `Option<Compression>` written as its label (`"4bit"`, `"8bit"`) or `null`;
/// reading also accepts `"nf4"` / `"int8"`.
pub(crate) mod label_serde {
    use super::Compression;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Option<Compression>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_str(c.label()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Compression>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Maps non-finite inputs to finite ones: NaN -> 0, ±inf -> ±`f32::MAX`.
#[inline]
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-f32::MAX, f32::MAX)
    }
}

/// Largest |x| of a block (after [`sanitize`]).
#[inline]
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, &x| m.max(sanitize(x).abs()))
}

/// Index of the codebook entry nearest to `v` (first one on ties), as a brute-force search over
/// [`NF4_CODEBOOK`] would find it.
#[inline]
fn nf4_code(v: f32) -> u8 {
    let d = |i: usize| (NF4_CODEBOOK[i] - v).abs();
    // Candidate from the sorted codebook, then settle on the exact first minimum (distances are
    // unimodal in the index, so a local search from a neighbour of the minimum finds it).
    let mut i = NF4_CODEBOOK.partition_point(|&c| c < v).min(15);
    while i > 0 && d(i - 1) <= d(i) {
        i -= 1;
    }
    while i < 15 && d(i + 1) < d(i) {
        i += 1;
    }
    i as u8
}

/// Per-block scales of `values` appended to `out` (NF4: absmax; INT8: absmax / 127).
pub(crate) fn block_scales(scheme: Compression, values: &[f32], out: &mut Vec<f32>) {
    for block in values.chunks(QUANT_BLOCK) {
        let a = block_absmax(block);
        out.push(match scheme {
            Compression::Nf4 => a,
            Compression::Int8 => a / 127.0,
        });
    }
}

/// Quantizes `values` (whose length need not be a multiple of the block) appending codes as raw
/// bytes to `codes` and scales to `scales`. Used by the splitter on block-aligned chunks.
pub(crate) fn quantize_append(
    scheme: Compression,
    values: &[f32],
    codes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    for block in values.chunks(QUANT_BLOCK) {
        let a = block_absmax(block);
        match scheme {
            Compression::Nf4 => {
                scales.push(a);
                let code = |k: usize| match block.get(k) {
                    Some(&x) if a > 0.0 => nf4_code(sanitize(x) / a),
                    _ => NF4_ZERO,
                };
                for k in (0..QUANT_BLOCK).step_by(2) {
                    codes.push(code(k) | (code(k + 1) << 4));
                }
            }
            Compression::Int8 => {
                let s = a / 127.0;
                scales.push(s);
                for k in 0..QUANT_BLOCK {
                    let q = match block.get(k) {
                        Some(&x) if s > 0.0 => (sanitize(x) / s).round().clamp(-127.0, 127.0),
                        _ => 0.0,
                    };
                    codes.push(q as i8 as u8);
                }
            }
        }
    }
}

/// [`quantize_append`] on all cores (rayon's pool): `values` is cut on block boundaries, the
/// parts quantized in parallel and appended in order, so the output is identical byte for byte.
pub(crate) fn quantize_append_parallel(
    scheme: Compression,
    values: &[f32],
    codes: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads().min(16);
    let blocks = values.len().div_ceil(QUANT_BLOCK);
    // Small tensors: not worth waking the pool.
    if threads == 1 || blocks < 64 * threads {
        return quantize_append(scheme, values, codes, scales);
    }
    let per = blocks.div_ceil(threads) * QUANT_BLOCK;
    let parts: Vec<(Vec<u8>, Vec<f32>)> = values
        .par_chunks(per)
        .map(|part| {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            quantize_append(scheme, part, &mut c, &mut s);
            (c, s)
        })
        .collect();
    for (c, s) in parts {
        codes.extend_from_slice(&c);
        scales.extend_from_slice(&s);
    }
}

/// NF4-quantizes `values`: `codes` and `absmax` are cleared and filled with
/// `ceil(n / 64) * 32` packed bytes (element `2k` in the low nibble, `2k + 1` in the high
/// nibble) and `ceil(n / 64)` per-block absmax values. Each code is the index of the
/// [`NF4_CODEBOOK`] entry nearest to `x / absmax` (the first on a tie); a block with absmax 0 and
/// the zero padding of a final partial block get code 7 (0.0). NaN counts as 0 and ±inf as
/// ±`f32::MAX`.
pub fn quantize_nf4(values: &[f32], codes: &mut Vec<u8>, absmax: &mut Vec<f32>) {
    codes.clear();
    absmax.clear();
    quantize_append(Compression::Nf4, values, codes, absmax);
}

/// INT8-quantizes `values`: `q` and `scales` are cleared and filled with `ceil(n / 64) * 64`
/// codes and `ceil(n / 64)` per-block scales `absmax / 127`. Each code is
/// `round(x / scale)` (half away from zero) clamped to `[-127, 127]`; 0 when the scale is 0 and
/// for the padding of a final partial block. NaN counts as 0 and ±inf as ±`f32::MAX`.
pub fn quantize_int8(values: &[f32], q: &mut Vec<i8>, scales: &mut Vec<f32>) {
    let mut bytes = Vec::with_capacity(Compression::Int8.codes_len(values.len()));
    scales.clear();
    quantize_append(Compression::Int8, values, &mut bytes, scales);
    q.clear();
    q.extend(bytes.into_iter().map(|b| b as i8));
}

/// Reference NF4 dequantization of the first `n` elements: `NF4_CODEBOOK[code] * absmax`.
pub fn dequantize_nf4(codes: &[u8], absmax: &[f32], n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let byte = codes[i / 2];
            let code = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            NF4_CODEBOOK[code as usize] * absmax[i / QUANT_BLOCK]
        })
        .collect()
}

/// Reference INT8 dequantization of the first `n` elements: `q * scale`.
pub fn dequantize_int8(q: &[i8], scales: &[f32], n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| q[i] as f32 * scales[i / QUANT_BLOCK])
        .collect()
}

/// Appends the little-endian values of `bytes` (elements of a float `dtype`) to `out` as `f32`.
/// Returns false for non-float dtypes.
pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) -> bool {
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => return false,
    }
    true
}

/// True for source dtypes the splitter can quantize.
pub(crate) fn is_quantizable_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
}

#[cfg(test)]
mod tests {
    /// The threaded quantization writes exactly what the serial one does (including a partial
    /// last block), for both schemes.
    #[test]
    fn parallel_quantization_is_identical() {
        let n = QUANT_BLOCK * 64 * 16 * 3 + 21;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * (1.0 + (i % 29) as f32))
            .collect();
        for scheme in [Compression::Nf4, Compression::Int8] {
            let (mut c1, mut s1, mut c2, mut s2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            quantize_append(scheme, &values, &mut c1, &mut s1);
            // A pool of several threads whatever this machine has, so the parts really split.
            rayon::ThreadPoolBuilder::new()
                .num_threads(4)
                .build()
                .unwrap()
                .install(|| quantize_append_parallel(scheme, &values, &mut c2, &mut s2));
            assert_eq!(c1, c2, "{scheme}");
            assert_eq!(s1, s2, "{scheme}");
        }
    }

    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!("4bit".parse::<Compression>().unwrap(), Compression::Nf4);
        assert_eq!("nf4".parse::<Compression>().unwrap(), Compression::Nf4);
        assert_eq!("8bit".parse::<Compression>().unwrap(), Compression::Int8);
        assert_eq!("int8".parse::<Compression>().unwrap(), Compression::Int8);
        let e = "3bit".parse::<Compression>().unwrap_err().to_string();
        assert!(
            e.contains("3bit") && e.contains("4bit") && e.contains("8bit"),
            "{e}"
        );
        assert_eq!(Compression::Nf4.to_string(), "4bit");
        assert_eq!(Compression::Int8.to_string(), "8bit");
        assert_eq!(serde_json::to_string(&Compression::Nf4).unwrap(), "\"nf4\"");
        assert_eq!(
            serde_json::to_string(&Compression::Int8).unwrap(),
            "\"int8\""
        );
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn nf4_code_matches_brute_force_near_midpoints() {
        let brute = |v: f32| {
            let mut best = 0;
            for i in 1..16 {
                if (NF4_CODEBOOK[i] - v).abs() < (NF4_CODEBOOK[best] - v).abs() {
                    best = i;
                }
            }
            best as u8
        };
        for w in NF4_CODEBOOK.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            let mut v = mid;
            for _ in 0..8 {
                v = v.next_down();
            }
            for _ in 0..16 {
                assert_eq!(nf4_code(v), brute(v), "{v}");
                v = v.next_up();
            }
        }
        for v in [-1.0f32, -0.99, 0.0, -0.0, 1.0, 0.5, 2.0, -3.0] {
            assert_eq!(nf4_code(v), brute(v), "{v}");
        }
    }
}
