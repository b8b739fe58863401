//! Pre-quantised checkpoints rabbitllm reads as they are shipped: `quantization_config` of the
//! block-scaled FP8 kind (DeepSeek-V3, the Qwen3 FP8 releases) and gpt-oss's MXFP4 experts.
//! Every other kind is refused by name, as is any setting that would change the numbers.

use serde_json::Value;

use crate::arch::{unsupported, Variant};
use crate::error::Result;

/// What a supported `quantization_config` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantized {
    /// FP8 weights with one scale per block of this size.
    Fp8Block([usize; 2]),
    /// MXFP4 routed experts (`_blocks` of packed E2M1 pairs, `_scales` of E8M0 exponents per
    /// 32 values).
    Mxfp4,
}

/// Reads a `quantization_config`.
pub fn quantized(v: &Variant, q: &Value) -> Result<Quantized> {
    let bad = |reason: String| unsupported(v, format!("`quantization_config`: {reason}"));
    let obj = q
        .as_object()
        .ok_or_else(|| bad(format!("must be an object, got {q}")))?;
    if obj.get("quant_method").and_then(Value::as_str) == Some("mxfp4") {
        for (key, value) in obj {
            match key.as_str() {
                // Which modules stay unquantised is read off the tensors (a family lists the
                // ones it reads as MXFP4).
                "quant_method" | "modules_to_not_convert" | "dequantize" => {}
                _ => return Err(bad(format!("`{key}` {value} is not supported"))),
            }
        }
        return Ok(Quantized::Mxfp4);
    }
    fp8_block(v, q).map(Quantized::Fp8Block)
}

/// The block size of an FP8 `quantization_config`
/// (`{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}`).
pub fn fp8_block(v: &Variant, q: &Value) -> Result<[usize; 2]> {
    let bad = |reason: String| unsupported(v, format!("`quantization_config`: {reason}"));
    let obj = q
        .as_object()
        .ok_or_else(|| bad(format!("must be an object, got {q}")))?;
    let method = obj.get("quant_method").and_then(Value::as_str);
    if method != Some("fp8") {
        return Err(bad(format!(
            "quant_method {} is not supported (pre-quantised checkpoints are read as block-scaled fp8, \
             and gpt-oss's mxfp4; for others use an unquantised checkpoint and `--compression`)",
            obj.get("quant_method").map_or("(none)".to_string(), Value::to_string)
        )));
    }
    for (key, value) in obj {
        match key.as_str() {
            "quant_method" | "weight_block_size" => {}
            // Which modules stay unquantised is read off the tensors themselves (a weight
            // without its `_scale_inv` is stored in a float type).
            "modules_to_not_convert" | "ignored_layers" => {}
            "fmt" if value.as_str() == Some("e4m3") => {}
            "activation_scheme" if value.as_str() == Some("dynamic") => {}
            // transformers' own loading switch.
            "dequantize" => {}
            _ => return Err(bad(format!("`{key}` {value} is not supported"))),
        }
    }
    let block = obj
        .get("weight_block_size")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`weight_block_size` must be a list of two sizes".into()))?;
    match block
        .iter()
        .map(Value::as_u64)
        .collect::<Option<Vec<u64>>>()
    {
        Some(b) if b.len() == 2 && b.iter().all(|&x| x > 0 && x <= 1 << 20) => {
            Ok([b[0] as usize, b[1] as usize])
        }
        _ => Err(bad(format!(
            "`weight_block_size` must be two positive sizes, got {}",
            Value::Array(block.clone())
        ))),
    }
}
