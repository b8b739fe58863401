//! `rabbit synth --like TARGET`: a checkpoint derived from another one, for measuring
//! speculative decoding honestly. Random weights make two independently made models disagree on
//! nearly every token; a draft derived from its target agrees in a known way: its first
//! `layers` decoder layers (with the embedding, final norm and LM head), every floating-point
//! tensor plus Gaussian noise of `noise` × that tensor's own standard deviation. `noise` 0 with
//! every layer is a bit-identical copy.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use half::{bf16, f16};
use rabbit_split::checkpoint::{read_config_json, Checkpoint, CONFIG_FILE};
use rabbit_split::writer::{AlignedWriter, TensorHeader};
use rabbit_split::Dtype;
use serde_json::Value;

use super::weights::{fnv1a64, Xoshiro256pp, WEIGHT_ALIGNMENT};
use super::{io_err, SynthError};

/// What to derive.
#[derive(Debug, Clone)]
pub struct LikeOptions {
    /// The checkpoint to derive from.
    pub target: PathBuf,
    /// Output directory (new or empty).
    pub out_dir: PathBuf,
    /// Decoder layers to keep (the first ones); `None`: all.
    pub layers: Option<usize>,
    /// Noise, in units of each tensor's standard deviation.
    pub noise: f64,
    /// Seed of the noise.
    pub seed: u64,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct LikeReport {
    /// Output directory.
    pub out_dir: PathBuf,
    /// Layers kept, of the target's.
    pub layers: (usize, usize),
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the weight file.
    pub bytes: u64,
}

/// The decoder layer a tensor belongs to (`….layers.N.…`), if any.
fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

fn invalid(option: &'static str, reason: String) -> SynthError {
    SynthError::InvalidOption { option, reason }
}

/// Writes the derived checkpoint: `model.safetensors`, the target's tokenizer and other small
/// files, and `config.json` (last) with the layer count changed.
pub fn derive_like(opts: &LikeOptions) -> Result<LikeReport, SynthError> {
    if !(opts.noise >= 0.0 && opts.noise.is_finite()) {
        return Err(invalid(
            "--noise",
            format!("must be >= 0, got {}", opts.noise),
        ));
    }
    let out = &opts.out_dir;
    if out.exists() {
        if !out.is_dir() {
            return Err(SynthError::NotADirectory { path: out.clone() });
        }
        let found: Vec<String> = fs::read_dir(out)
            .map_err(io_err(out))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .take(3)
            .collect();
        if !found.is_empty() {
            return Err(SynthError::ForeignDirectory {
                dir: out.clone(),
                found: found.join(", "),
            });
        }
    }
    let mut config = read_config_json(&opts.target)?;
    let total = config
        .get("num_hidden_layers")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            invalid(
                "--like",
                format!(
                    "{}: config.json has no num_hidden_layers",
                    opts.target.display()
                ),
            )
        })? as usize;
    let keep = opts.layers.unwrap_or(total);
    if keep == 0 || keep > total {
        return Err(invalid(
            "--layers",
            format!(
                "{keep}: {} has {total} decoder layers",
                opts.target.display()
            ),
        ));
    }
    let ckpt = Checkpoint::open(&opts.target)?;
    let created = !out.exists();
    let result = write_like(opts, &ckpt, &mut config, keep, total);
    if result.is_err() && created {
        // Only what this call wrote is there (the writer removes its temporary file).
        let _ = fs::remove_dir_all(out);
    }
    result
}

fn write_like(
    opts: &LikeOptions,
    ckpt: &Checkpoint,
    config: &mut Value,
    keep: usize,
    total: usize,
) -> Result<LikeReport, SynthError> {
    let out = &opts.out_dir;
    let names: Vec<&rabbit_split::checkpoint::TensorLoc> = ckpt
        .tensors()
        .filter(|t| layer_of(&t.name).is_none_or(|l| l < keep))
        .collect();
    let headers: Vec<TensorHeader> = names
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    fs::create_dir_all(out).map_err(io_err(out))?;
    let weights = out.join("model.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut w = AlignedWriter::create(&weights, headers, meta, WEIGHT_ALIGNMENT)?;
    let mut buf = Vec::new();
    for t in &names {
        ckpt.read_tensor(&t.name, &mut buf)?;
        if opts.noise > 0.0 {
            perturb(&mut buf, t.dtype, opts.noise, opts.seed, &t.name);
        }
        w.write_data(&buf)?;
    }
    let written = w.finish()?;
    // The target's tokenizer, chat template and generation config; not its weights or index.
    for entry in fs::read_dir(&opts.target).map_err(io_err(&opts.target))? {
        let entry = entry.map_err(io_err(&opts.target))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weight = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".index.json")
            || name.ends_with(".pt");
        if weight || name == CONFIG_FILE || !entry.path().is_file() {
            continue;
        }
        fs::copy(entry.path(), out.join(&name)).map_err(io_err(&entry.path()))?;
    }
    config["num_hidden_layers"] = Value::from(keep);
    for key in ["layer_types", "max_window_layers_list"] {
        if let Some(Value::Array(a)) = config.get_mut(key) {
            a.truncate(keep);
        }
    }
    let mut text = serde_json::to_string_pretty(&*config).expect("JSON value serializes");
    text.push('\n');
    rabbit_split::fsutil::write_atomic(&out.join(CONFIG_FILE), text.as_bytes())?;
    Ok(LikeReport {
        out_dir: out.clone(),
        layers: (keep, total),
        tensors: names.len(),
        bytes: written.size,
    })
}

/// Reads one element's little-endian bytes.
type Decode = fn(&[u8]) -> f32;
/// Writes one element (the first `width` bytes are used).
type Encode = fn(f32) -> [u8; 4];

/// Adds `noise × std(tensor)` Gaussian noise to a float tensor's little-endian bytes in place
/// (other dtypes are copied unchanged). Deterministic in (seed, tensor name).
fn perturb(bytes: &mut [u8], dtype: Dtype, noise: f64, seed: u64, name: &str) {
    let (width, get, put): (usize, Decode, Encode) = match dtype {
        Dtype::F32 => (
            4,
            |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            |x| x.to_le_bytes(),
        ),
        Dtype::BF16 => (
            2,
            |b| bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            |x| {
                let b = bf16::from_f32(x).to_le_bytes();
                [b[0], b[1], 0, 0]
            },
        ),
        Dtype::F16 => (
            2,
            |b| f16::from_le_bytes([b[0], b[1]]).to_f32(),
            |x| {
                let b = f16::from_f32(x).to_le_bytes();
                [b[0], b[1], 0, 0]
            },
        ),
        _ => return,
    };
    let n = bytes.len() / width;
    if n < 2 {
        return;
    }
    let (mut sum, mut sq) = (0f64, 0f64);
    for c in bytes.chunks_exact(width) {
        let x = get(c) as f64;
        sum += x;
        sq += x * x;
    }
    let mean = sum / n as f64;
    let std = (sq / n as f64 - mean * mean).max(0.0).sqrt();
    let scale = (std * noise) as f32;
    let mut rng = Xoshiro256pp::for_chunk(seed, fnv1a64(name), 0);
    for c in bytes.chunks_exact_mut(width) {
        let x = get(c) + scale * rng.next_normal();
        c.copy_from_slice(&put(x)[..width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_numbers_are_read_from_the_name() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("transformer.encoder.layers.0.x"), Some(0));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("model.norm.weight"), None);
    }

    #[test]
    fn noise_is_scaled_to_the_tensor_and_seeded() {
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 / 100.0).sin()).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut a = bytes.clone();
        let mut b = bytes.clone();
        perturb(&mut a, Dtype::F32, 0.1, 1, "t");
        perturb(&mut b, Dtype::F32, 0.1, 1, "t");
        assert_eq!(a, b);
        let diffs: Vec<f32> = a
            .chunks_exact(4)
            .zip(&vals)
            .map(|(c, v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) - v)
            .collect();
        let rms = (diffs.iter().map(|d| d * d).sum::<f32>() / diffs.len() as f32).sqrt();
        // std(sin) ~ 0.7: noise ~ 0.07.
        assert!((0.05..0.09).contains(&rms), "{rms}");
    }
}
