//! gpt-oss's MXFP4 experts: each weight stored as `{base}_blocks[e]` (`[rows, cols / 32, 16]`
//! bytes, two E2M1 values per byte, low nibble first) and `{base}_scales[e]` (`[rows,
//! cols / 32]`, one E8M0 exponent per 32 values: `2^(byte - 127)`), dequantized after reading
//! into `{base}[e]` in the layout the bf16 checkpoints store (`[cols, rows]`, applied as `x · W`).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};

/// The E2M1 values of the 16 codes (transformers' `FP4_VALUES`).
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Moves every MXFP4 pair of `raw` into `out`, dequantized to `kind`. A block tensor without
/// its exponents (or the reverse) is refused by name.
pub fn dequantize_mxfp4_pairs(
    file: &str,
    raw: &mut BTreeMap<String, Tensor>,
    out: &mut BTreeMap<String, Tensor>,
    kind: Kind,
) -> Result<()> {
    let bad = |tensor: &str, reason: String| CoreError::BadTensor {
        file: file.into(),
        tensor: tensor.to_string(),
        reason,
    };
    let blocks: Vec<String> = raw
        .keys()
        .filter(|n| n.contains("_blocks"))
        .cloned()
        .collect();
    for b_name in blocks {
        let s_name = b_name.replacen("_blocks", "_scales", 1);
        let (Some(b), Some(s)) = (raw.remove(&b_name), raw.remove(&s_name)) else {
            return Err(bad(
                &b_name,
                format!("MXFP4 blocks without their exponents `{s_name}`"),
            ));
        };
        let w = dequantize(&b, &s, kind).map_err(|reason| bad(&b_name, reason))?;
        out.insert(b_name.replacen("_blocks", "", 1), w);
    }
    if let Some(name) = raw.keys().find(|n| n.contains("_scales")) {
        return Err(bad(name, "MXFP4 exponents without their blocks".into()));
    }
    Ok(())
}

/// `[rows, g, 16]` codes and `[rows, g]` exponents to the `[g * 32, rows]` weight.
fn dequantize(blocks: &Tensor, scales: &Tensor, kind: Kind) -> std::result::Result<Tensor, String> {
    let (bs, ss) = (blocks.size(), scales.size());
    let ok = bs.len() == 3 && bs[2] == 16 && ss.len() == 2 && ss[..] == bs[..2];
    if !ok || blocks.kind() != Kind::Uint8 || scales.kind() != Kind::Uint8 {
        return Err(format!(
            "MXFP4 blocks {bs:?} {:?} with exponents {ss:?} {:?}: expected [rows, g, 16] and [rows, g] bytes",
            blocks.kind(),
            scales.kind()
        ));
    }
    let run = || -> std::result::Result<Tensor, tch::TchError> {
        let device = blocks.device();
        let lut = Tensor::f_from_slice(&E2M1)?.f_to_device(device)?;
        let codes = blocks.f_to_kind(Kind::Int64)?;
        let lo = lut.f_index_select(0, &codes.f_bitwise_and(15)?.f_flatten(0, -1)?)?;
        let hi = lut.f_index_select(
            0,
            &codes
                .f_bitwise_right_shift_tensor_scalar(4)?
                .f_flatten(0, -1)?,
        )?;
        // Element 2j of a block is the low nibble of byte j, 2j + 1 the high one.
        let values = Tensor::f_stack(&[lo, hi], -1)?.f_reshape([bs[0], bs[1], 32])?;
        let exp = scales
            .f_to_kind(Kind::Float)?
            .f_sub_scalar(127.0)?
            .f_exp2()?
            .f_unsqueeze(-1)?;
        values
            .f_mul(&exp)?
            .f_reshape([bs[0], bs[1] * 32])?
            .f_to_kind(kind)?
            .f_transpose(0, 1)
    };
    run().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Codes and exponents land where transformers' `convert_moe_packed_tensors` puts them.
    #[test]
    fn nibbles_and_exponents_land_in_place() {
        // One row, one block: byte j = (hi << 4) | lo with lo = j, hi = 15 - j.
        let bytes: Vec<u8> = (0..16u8).map(|j| ((15 - j) << 4) | j).collect();
        let blocks = Tensor::from_slice(&bytes).reshape([1, 1, 16]);
        let scales = Tensor::from_slice(&[128u8]).reshape([1, 1]);
        let mut raw = BTreeMap::new();
        raw.insert("w_blocks[0]".to_string(), blocks);
        raw.insert("w_scales[0]".to_string(), scales);
        let mut out = BTreeMap::new();
        dequantize_mxfp4_pairs("f", &mut raw, &mut out, Kind::Float).unwrap();
        let w = &out["w[0]"];
        assert_eq!(w.size(), [32, 1]);
        let v = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        for j in 0..16 {
            assert_eq!(v[2 * j], 2.0 * E2M1[j], "low nibble of byte {j}");
            assert_eq!(v[2 * j + 1], 2.0 * E2M1[15 - j], "high nibble of byte {j}");
        }
        let mut raw = BTreeMap::new();
        raw.insert(
            "w_blocks[0]".to_string(),
            Tensor::zeros([1, 1, 16], (Kind::Uint8, Device::Cpu)),
        );
        let e = dequantize_mxfp4_pairs("f", &mut raw, &mut BTreeMap::new(), Kind::Float);
        assert!(e.unwrap_err().to_string().contains("w_scales[0]"));
    }
}
