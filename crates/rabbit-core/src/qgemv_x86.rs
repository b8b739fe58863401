//! AVX-512 (and AVX2 + FMA) kernels of [`crate::qgemv`]: one output of a packed weight for up to
//! [`MAX_DIRECT_ROWS`](crate::qgemv::MAX_DIRECT_ROWS) input rows, each block's weights made in
//! registers (NF4: the block's 16 scaled codebook values in one register, looked up with
//! `vpermps`; int8: sign-extend, convert, scale) and rounded to bf16 exactly as
//! [`crate::dequant`] rounds them. Selected at run time: AVX-512F, else AVX2 + FMA.

use std::arch::x86_64::*;

use rabbit_split::NF4_CODEBOOK;

/// Calls `$f::<R>($args…)` for `R` = `$rows` (1..=8): the row count as a constant, so each
/// row's accumulators stay in registers.
macro_rules! by_rows {
    ($rows:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            _ => unreachable!("1..=8 rows"),
        }
    };
}

/// Rounds 16 f32 lanes to bf16 (nearest, ties to even), kept as f32: `dequant`'s rounding.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bf16(v: __m512) -> __m512 {
    let i = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(0x7fff)), lsb);
    _mm512_castsi512_ps(_mm512_and_si512(
        r,
        _mm512_set1_epi32(0xffff_0000_u32 as i32),
    ))
}

/// NF4 row `out[r] = Σ_j lut[lo_j]·xa[r, j] + lut[hi_j]·xb[r, j]` over one weight row's
/// `codes` (`half` bytes, blocks of `block / 2`), `xa`/`xb` the even/odd input positions
/// (`rows × half` each).
///
/// # Safety
/// AVX-512F must be available; `codes` holds `half` bytes, `scales` `half / (block / 2)`
/// values, `xa`/`xb` `rows × half` values, `out` `rows` values, `block` is a multiple of 32 and
/// `rows` is 1..=8.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn nf4_row(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    xa: &[f32],
    xb: &[f32],
    half: usize,
    rows: usize,
    out: &mut [f32],
) {
    // SAFETY (for the calls below): forwarded from this function's contract.
    unsafe {
        by_rows!(
            rows,
            nf4_rows(codes, scales, block, bf16, xa, xb, half, out)
        )
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn nf4_rows<const R: usize>(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    xa: &[f32],
    xb: &[f32],
    half: usize,
    out: &mut [f32],
) {
    let cpb = block / 2;
    // SAFETY: the codebook has 16 values; every other load stays within the slices the
    // contract sizes (block b covers code bytes and input positions b·cpb .. (b + 1)·cpb).
    unsafe {
        let book = _mm512_loadu_ps(NF4_CODEBOOK.as_ptr());
        let nibble = _mm512_set1_epi32(0x0f);
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        for (b, &s) in scales.iter().enumerate() {
            let mut lut = _mm512_mul_ps(book, _mm512_set1_ps(s));
            if bf16 {
                lut = round_bf16(lut);
            }
            for g in (0..cpb).step_by(16) {
                let at = b * cpb + g;
                let c =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.as_ptr().add(at) as *const __m128i));
                let wl = _mm512_permutexvar_ps(_mm512_and_si512(c, nibble), lut);
                let wh = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut);
                for r in 0..R {
                    let xe = _mm512_loadu_ps(xa.as_ptr().add(r * half + at));
                    let xo = _mm512_loadu_ps(xb.as_ptr().add(r * half + at));
                    even[r] = _mm512_fmadd_ps(wl, xe, even[r]);
                    odd[r] = _mm512_fmadd_ps(wh, xo, odd[r]);
                }
            }
        }
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
        }
    }
}

/// int8 row `out[r] = Σ_k round(code_k · scale)·x[r, k]` over one weight row's `codes` (`k`
/// bytes, blocks of `block`), `x` `rows × k`.
///
/// # Safety
/// AVX-512F must be available; `codes` holds `k` bytes, `scales` `k / block` values, `x`
/// `rows × k` values, `out` `rows` values, `block` is a multiple of 32 and `rows` is 1..=8.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn int8_row(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    x: &[f32],
    k: usize,
    rows: usize,
    out: &mut [f32],
) {
    // SAFETY (for the calls below): forwarded from this function's contract.
    unsafe { by_rows!(rows, int8_rows(codes, scales, block, bf16, x, k, out)) }
}

#[target_feature(enable = "avx512f")]
unsafe fn int8_rows<const R: usize>(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    // SAFETY: every load stays within the slices the contract sizes (block b covers code
    // bytes and input positions b·block .. (b + 1)·block).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (b, &s) in scales.iter().enumerate() {
            let scale = _mm512_set1_ps(s);
            for g in (0..block).step_by(32) {
                let at = b * block + g;
                let w = |off: usize| {
                    let c = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        codes.as_ptr().add(at + off) as *const __m128i
                    ));
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(c), scale);
                    if bf16 {
                        round_bf16(v)
                    } else {
                        v
                    }
                };
                let (w0, w1) = (w(0), w(16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xp = x.as_ptr().add(r * k + at);
                    a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[0]);
                    a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[1]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        }
    }
}

/// Rounds 8 f32 lanes to bf16 (nearest, ties to even), kept as f32: `dequant`'s rounding.
#[inline]
#[target_feature(enable = "avx2")]
fn round_bf16_avx2(v: __m256) -> __m256 {
    let i = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    let r = _mm256_add_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(0x7fff)), lsb);
    _mm256_castsi256_ps(_mm256_and_si256(
        r,
        _mm256_set1_epi32(0xffff_0000_u32 as i32),
    ))
}

/// The sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_avx2(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(_mm_hadd_ps(s, s))
}

/// [`nf4_row`] with AVX2 and FMA (8 lanes): the 16-entry table is two registers, each index
/// looked up in both with `vpermps` and the half chosen by its bit 3.
///
/// # Safety
/// AVX2 and FMA must be available; otherwise as [`nf4_row`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn nf4_row_avx2(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    xa: &[f32],
    xb: &[f32],
    half: usize,
    rows: usize,
    out: &mut [f32],
) {
    // SAFETY (for the calls below): forwarded from this function's contract.
    unsafe {
        by_rows!(
            rows,
            nf4_rows_avx2(codes, scales, block, bf16, xa, xb, half, out)
        )
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn nf4_rows_avx2<const R: usize>(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    xa: &[f32],
    xb: &[f32],
    half: usize,
    out: &mut [f32],
) {
    let cpb = block / 2;
    // SAFETY: the codebook has 16 values; every other load stays within the slices the
    // contract sizes (block b covers code bytes and input positions b·cpb .. (b + 1)·cpb).
    unsafe {
        let book_lo = _mm256_loadu_ps(NF4_CODEBOOK.as_ptr());
        let book_hi = _mm256_loadu_ps(NF4_CODEBOOK.as_ptr().add(8));
        let (nibble, seven) = (_mm256_set1_epi32(0x0f), _mm256_set1_epi32(7));
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, &s) in scales.iter().enumerate() {
            let scale = _mm256_set1_ps(s);
            let (mut lo, mut hi) = (_mm256_mul_ps(book_lo, scale), _mm256_mul_ps(book_hi, scale));
            if bf16 {
                lo = round_bf16_avx2(lo);
                hi = round_bf16_avx2(hi);
            }
            let look = |idx: __m256i| {
                let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                _mm256_blendv_ps(
                    _mm256_permutevar8x32_ps(lo, idx),
                    _mm256_permutevar8x32_ps(hi, idx),
                    upper,
                )
            };
            for g in (0..cpb).step_by(8) {
                let at = b * cpb + g;
                let c =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(at) as *const __m128i));
                let wl = look(_mm256_and_si256(c, nibble));
                let wh = look(_mm256_srli_epi32(c, 4));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xe = _mm256_loadu_ps(xa.as_ptr().add(r * half + at));
                    let xo = _mm256_loadu_ps(xb.as_ptr().add(r * half + at));
                    *a = _mm256_fmadd_ps(wh, xo, _mm256_fmadd_ps(wl, xe, *a));
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum_avx2(a);
        }
    }
}

/// [`int8_row`] with AVX2 and FMA (8 lanes).
///
/// # Safety
/// AVX2 and FMA must be available; otherwise as [`int8_row`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn int8_row_avx2(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    x: &[f32],
    k: usize,
    rows: usize,
    out: &mut [f32],
) {
    // SAFETY (for the calls below): forwarded from this function's contract.
    unsafe { by_rows!(rows, int8_rows_avx2(codes, scales, block, bf16, x, k, out)) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn int8_rows_avx2<const R: usize>(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    bf16: bool,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    // SAFETY: every load stays within the slices the contract sizes (block b covers code
    // bytes and input positions b·block .. (b + 1)·block).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, &s) in scales.iter().enumerate() {
            let scale = _mm256_set1_ps(s);
            for g in (0..block).step_by(8) {
                let at = b * block + g;
                let c =
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(codes.as_ptr().add(at) as *const __m128i));
                let mut w = _mm256_mul_ps(_mm256_cvtepi32_ps(c), scale);
                if bf16 {
                    w = round_bf16_avx2(w);
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(r * k + at)), *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum_avx2(a);
        }
    }
}
