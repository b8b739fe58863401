//! x86-64 SSE kernels of the CPU dequantization into bf16 (the hot path of a compressed split
//! on CPU): selected at run time when the CPU has SSSE3/SSE4.1, bit-identical to the portable
//! loops in [`crate::dequant`].

use rabbit_split::NF4_CODEBOOK;

/// Rounds four f32 lanes to bf16 bits (in the low half of each 32-bit lane), exactly like
/// `Bf16Bits::from_f32` in `dequant`.
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
#[target_feature(enable = "sse4.1")]
pub(crate) unsafe fn int8_bf16_sse(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    blocks: usize,
    out: *mut u16,
) {
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
/// the stored order (low nibble first). Rounds exactly like `Bf16Bits::from_f32` in `dequant`.
#[target_feature(enable = "ssse3,sse4.1")]
pub(crate) unsafe fn nf4_bf16_sse(
    codes: &[u8],
    scales: &[f32],
    block: usize,
    blocks: usize,
    out: *mut u16,
) {
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
