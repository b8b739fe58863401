//! The FP8 weights of pre-quantised checkpoints (DeepSeek-V3, the Qwen3 FP8 releases): each
//! stored as F8_E4M3 beside one scale per block, dequantized on the compute device after it is
//! read.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};

/// Dequantizes a unit's FP8 weights: each `W` stored as F8_E4M3 beside its block scales
/// `W_scale_inv` (`[⌈rows/bm⌉, ⌈cols/bn⌉]`, blocks of `block`) leaves `raw` and enters `out` as
/// `w · scale` of its block in f32, cast to `kind` (DeepSeek's `weight_dequant`; transformers'
/// `Fp8Dequantize` for shapes the blocks divide). `block` `None` (no FP8 quantization config)
/// refuses FP8 weights. An FP8 tensor without its scale is refused by name.
pub fn dequantize_fp8_pairs(
    file: &str,
    raw: &mut BTreeMap<String, Tensor>,
    out: &mut BTreeMap<String, Tensor>,
    kind: Kind,
    block: Option<[usize; 2]>,
) -> Result<()> {
    const SUFFIX: &str = "_scale_inv";
    let bad = |tensor: &str, reason: String| CoreError::BadTensor {
        file: file.into(),
        tensor: tensor.to_string(),
        reason,
    };
    let scales: Vec<String> = raw
        .keys()
        .filter(|n| n.ends_with(SUFFIX))
        .cloned()
        .collect();
    for s_name in scales {
        let w_name = &s_name[..s_name.len() - SUFFIX.len()];
        match raw.get(w_name).map(Tensor::kind) {
            Some(Kind::Float8e4m3fn) => {}
            Some(k) => {
                return Err(bad(
                    &s_name,
                    format!("a block scale of `{w_name}`, which is stored as {k:?}, not FP8"),
                ))
            }
            None => {
                return Err(bad(
                    &s_name,
                    format!("a block scale without its weight `{w_name}`"),
                ))
            }
        }
        let (w, s) = (raw.remove(w_name), raw.remove(&s_name));
        let (Some(w), Some(s)) = (w, s) else {
            unreachable!("both present: checked above")
        };
        let t = fp8_dequant(&w, &s, kind, block).map_err(|reason| bad(w_name, reason))?;
        out.insert(w_name.to_string(), t);
    }
    if let Some((name, _)) = raw.iter().find(|(_, t)| t.kind() == Kind::Float8e4m3fn) {
        return Err(bad(
            name,
            format!("an FP8 tensor without its scale `{name}{SUFFIX}`"),
        ));
    }
    Ok(())
}

/// One FP8 weight `[rows, cols]` times its block scales, in f32, then cast to `kind`.
fn fp8_dequant(
    w: &Tensor,
    s: &Tensor,
    kind: Kind,
    block: Option<[usize; 2]>,
) -> std::result::Result<Tensor, String> {
    let (ws, ss) = (w.size(), s.size());
    let ([rows, cols], [sr, sc]) = (ws.as_slice(), ss.as_slice()) else {
        return Err(format!(
            "FP8 weight {ws:?} with scales {ss:?}: both must be matrices"
        ));
    };
    let (rows, cols, sr, sc) = (*rows, *cols, *sr, *sc);
    if !matches!(s.kind(), Kind::Float | Kind::BFloat16 | Kind::Half) {
        // E8M0 exponents (MXFP8) or anything else would be read as plain factors.
        return Err(format!(
            "FP8 block scales stored as {:?}: only float32, bfloat16 or float16 scales are read",
            s.kind()
        ));
    }
    // The block size cannot be read off the shapes (partial blocks): config.json says it.
    let Some([bm, bn]) = block.map(|[a, b]| [a as i64, b as i64]) else {
        return Err(
            "an FP8 weight, but config.json's `quantization_config` gives no `weight_block_size`"
                .into(),
        );
    };
    if sr != (rows + bm - 1) / bm || sc != (cols + bn - 1) / bn {
        return Err(format!(
            "FP8 weight {ws:?} needs [{}, {}] scales of {bm}x{bn} blocks, found {ss:?}",
            (rows + bm - 1) / bm,
            (cols + bn - 1) / bn
        ));
    }
    let run = || -> std::result::Result<Tensor, tch::TchError> {
        let scale = s
            .f_to_kind(Kind::Float)?
            .f_repeat_interleave_self_int(bm, Some(0), None)?
            .f_repeat_interleave_self_int(bn, Some(1), None)?
            .f_narrow(0, 0, rows)?
            .f_narrow(1, 0, cols)?;
        w.f_to_kind(Kind::Float)?.f_mul(&scale)?.f_to_kind(kind)
    };
    run().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Partial blocks (shapes the blocks do not divide, as DeepSeek-V3's 576-row
    /// `kv_a_proj_with_mqa` under 128x128 blocks) take the scale of the block they start.
    #[test]
    fn fp8_partial_blocks_take_their_blocks_scale() {
        let w = Tensor::randn([5, 7], (Kind::Float, Device::Cpu))
            .f_to_kind(Kind::Float8e4m3fn)
            .unwrap();
        let s = Tensor::rand([2, 2], (Kind::Float, Device::Cpu));
        let mut raw = BTreeMap::new();
        raw.insert("w".to_string(), w.shallow_clone());
        raw.insert("w_scale_inv".to_string(), s.shallow_clone());
        let mut out = BTreeMap::new();
        dequantize_fp8_pairs("f", &mut raw, &mut out, Kind::Float, Some([4, 4])).unwrap();
        assert!(raw.is_empty());
        let got = Vec::<f32>::try_from(out["w"].f_flatten(0, -1).unwrap()).unwrap();
        let wf = Vec::<f32>::try_from(w.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let sf = Vec::<f32>::try_from(s.flatten(0, -1)).unwrap();
        for i in 0..5 {
            for j in 0..7 {
                assert_eq!(
                    got[i * 7 + j],
                    wf[i * 7 + j] * sf[(i / 4) * 2 + j / 4],
                    "{i},{j}"
                );
            }
        }
        // Scales of another grid, or none at all, are refused naming the weight.
        let mut raw = BTreeMap::new();
        raw.insert("w".to_string(), w.shallow_clone());
        raw.insert(
            "w_scale_inv".to_string(),
            Tensor::rand([1, 2], (Kind::Float, Device::Cpu)),
        );
        let e = dequantize_fp8_pairs(
            "f",
            &mut raw,
            &mut BTreeMap::new(),
            Kind::Float,
            Some([4, 4]),
        );
        assert!(e.unwrap_err().to_string().contains("[2, 2] scales"));
        let mut raw = BTreeMap::new();
        raw.insert("w".to_string(), w);
        let e = dequantize_fp8_pairs(
            "f",
            &mut raw,
            &mut BTreeMap::new(),
            Kind::Float,
            Some([4, 4]),
        );
        assert!(e.unwrap_err().to_string().contains("w_scale_inv"));
        // Byte scales (E8M0 exponents) and a missing block size are refused, not guessed.
        for (scale, block) in [
            (
                Tensor::ones([2, 2], (Kind::Uint8, Device::Cpu)),
                Some([4, 4]),
            ),
            (Tensor::rand([2, 2], (Kind::Float, Device::Cpu)), None),
        ] {
            let w = Tensor::randn([5, 7], (Kind::Float, Device::Cpu)).to_kind(Kind::Float8e4m3fn);
            let mut raw = BTreeMap::new();
            raw.insert("w".to_string(), w);
            raw.insert("w_scale_inv".to_string(), scale);
            let e = dequantize_fp8_pairs("f", &mut raw, &mut BTreeMap::new(), Kind::Float, block);
            assert!(e.is_err(), "{block:?}");
        }
    }
}
