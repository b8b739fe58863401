//! Reading a local Hugging Face checkpoint: `model.safetensors`, or
//! `model.safetensors.index.json` plus its shards; failing those, the PyTorch weights
//! `pytorch_model.bin` or `pytorch_model.bin.index.json` plus its shards (read by
//! [`crate::torch_bin`] without running Python). Only headers are parsed when opening; tensor
//! bytes are read later with positioned reads (`pread`) into caller-owned buffers.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::dtype::Dtype;
use crate::error::{Result, SplitError};
use crate::safetensors_header::read_safetensors_header;

/// Name of the single-file weights of a HF checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded HF checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the single-file PyTorch weights (`torch.save` zip archive) of a HF checkpoint.
pub const TORCH_SINGLE_FILE: &str = "pytorch_model.bin";
/// Name of the shard index of a sharded PyTorch HF checkpoint.
pub const TORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";
/// Name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Where one tensor's bytes live in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLoc {
    /// Full tensor name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Weight file holding it.
    pub file: PathBuf,
    /// Index of `file` in [`Checkpoint::files`].
    pub file_index: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first byte in `file`.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// An opened checkpoint: every weight file's header parsed and cross-checked.
#[derive(Debug)]
pub struct Checkpoint {
    /// Checkpoint directory.
    pub dir: PathBuf,
    /// Weight files (`model.safetensors` or `pytorch_model.bin`, or the shards in name order).
    pub files: Vec<PathBuf>,
    /// The shard index, for sharded checkpoints.
    pub index: Option<PathBuf>,
    /// The format of the weight files.
    pub format: WeightFormat,
    tensors: BTreeMap<String, TensorLoc>,
    handles: Vec<OnceLock<File>>,
}

/// Reads and parses `config.json` of a checkpoint directory.
pub fn read_config_json(checkpoint_dir: &Path) -> Result<serde_json::Value> {
    let path = checkpoint_dir.join(CONFIG_FILE);
    let bytes = read_config_bytes(checkpoint_dir)?;
    serde_json::from_slice(&bytes).map_err(|e| SplitError::BadConfig {
        file: path,
        reason: e.to_string(),
    })
}

fn read_config_bytes(dir: &Path) -> Result<Vec<u8>> {
    crate::fsutil::read_regular(&dir.join(CONFIG_FILE))?.ok_or_else(|| SplitError::MissingConfig {
        dir: dir.to_path_buf(),
    })
}

/// The format of a checkpoint's weight files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// safetensors files.
    Safetensors,
    /// PyTorch `torch.save` zip archives (`.bin`), read without executing their pickle.
    PyTorch,
}

/// The weight files of a checkpoint, found without parsing any safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// Their format.
    pub format: WeightFormat,
    /// `model.safetensors`, or every shard named by the index (sorted, unique).
    pub files: Vec<PathBuf>,
    /// The index file when the checkpoint is sharded.
    pub index: Option<PathBuf>,
    /// For sharded checkpoints: tensor name -> shard file name, as the index says.
    pub weight_map: BTreeMap<String, String>,
}

/// Finds the weight files the way `transformers` does: `model.safetensors` if present, else its
/// shard index, else `pytorch_model.bin`, else its shard index. Fails when there are no weights
/// or a listed shard is missing.
pub fn weight_files(dir: &Path) -> Result<WeightFiles> {
    let formats = [
        (WeightFormat::Safetensors, SINGLE_FILE, INDEX_FILE),
        (WeightFormat::PyTorch, TORCH_SINGLE_FILE, TORCH_INDEX_FILE),
    ];
    for (format, single, index) in formats {
        let single = dir.join(single);
        if is_present_file(&single)? {
            return Ok(WeightFiles {
                format,
                files: vec![single],
                index: None,
                weight_map: BTreeMap::new(),
            });
        }
        let index = dir.join(index);
        if is_present_file(&index)? {
            return read_index(dir, format, index);
        }
    }
    Err(SplitError::MissingWeights {
        dir: dir.to_path_buf(),
    })
}

/// Reads a shard index and checks every shard it names is there.
fn read_index(dir: &Path, format: WeightFormat, index: PathBuf) -> Result<WeightFiles> {
    let Some(bytes) = crate::fsutil::read_regular(&index)? else {
        return Err(SplitError::MissingWeights {
            dir: dir.to_path_buf(),
        });
    };
    let bad = |reason: String| SplitError::BadIndex {
        index: index.clone(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if !json.get("weight_map").is_some_and(|m| m.is_object()) {
        return Err(bad("no \"weight_map\" object".into()));
    }
    #[derive(serde::Deserialize)]
    struct IndexJson {
        weight_map: crate::jsonutil::Entries,
    }
    let map = serde_json::from_slice::<IndexJson>(&bytes)
        .map_err(|e| bad(e.to_string()))?
        .weight_map;
    if let Some(tensor) = map.first_duplicate() {
        return Err(bad(format!(
            "weight_map lists tensor {tensor} more than once"
        )));
    }
    let mut weight_map = BTreeMap::new();
    let mut shards = BTreeSet::new();
    for (tensor, shard) in &map.0 {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry for {tensor} is not a file name")))?;
        if shard.is_empty()
            || shard.contains('/')
            || shard.contains('\\')
            || shard == "."
            || shard == ".."
        {
            return Err(bad(format!(
                "weight_map entry for {tensor} names {shard:?}, which is not a plain file name"
            )));
        }
        shards.insert(shard.to_string());
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    if shards.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    let mut files = Vec::with_capacity(shards.len());
    for shard in shards {
        let p = dir.join(&shard);
        if !is_present_file(&p)? {
            return Err(SplitError::MissingShard {
                index: index.clone(),
                shard,
            });
        }
        files.push(p);
    }
    Ok(WeightFiles {
        format,
        files,
        index: Some(index),
        weight_map,
    })
}

/// Whether a weight file is there: `false` when nothing of that name exists, an error naming it
/// when something that is not a regular file does (a directory, a FIFO, a symlink loop or a
/// dangling symlink), so that is not mistaken for "no weights".
fn is_present_file(path: &Path) -> Result<bool> {
    match fs::metadata(path) {
        Ok(md) if md.is_file() => Ok(true),
        Ok(md) => Err(SplitError::NotAFile {
            path: path.to_path_buf(),
            kind: crate::fsutil::file_kind(md.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::read_link(path) {
            Ok(target) => Err(SplitError::io(
                path,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "symbolic link to {}, which does not exist",
                        target.display()
                    ),
                ),
            )),
            Err(_) => Ok(false),
        },
        Err(e) => Err(SplitError::io(path, e)),
    }
}

/// Cheap identity of a checkpoint's contents: XXH3 over the names, sizes and modification times
/// of the weight files (and index) plus the bytes of `config.json`. Computed from `stat` calls
/// only, so checking whether a split is current costs milliseconds, not a read of the weights.
pub fn source_fingerprint(dir: &Path) -> Result<String> {
    let w = weight_files(dir)?;
    fingerprint_of(dir, &w.files, w.index.as_deref())
}

fn fingerprint_of(dir: &Path, files: &[PathBuf], index: Option<&Path>) -> Result<String> {
    let mut text = Vec::with_capacity(256);
    text.extend_from_slice(b"rabbit-split fingerprint v1\n");
    let mut entry = |tag: &str, p: &Path| -> Result<()> {
        let md = fs::metadata(p).map_err(|e| SplitError::io(p, e))?;
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        writeln!(
            text,
            "{tag}\t{name}\t{}\t{}.{:09}",
            md.len(),
            md.mtime(),
            md.mtime_nsec()
        )
        .expect("write to Vec");
        Ok(())
    };
    for f in files {
        entry("weights", f)?;
    }
    if let Some(i) = index {
        entry("index", i)?;
    }
    let config = read_config_bytes(dir)?;
    writeln!(text, "config\t{}", config.len()).expect("write to Vec");
    text.extend_from_slice(&config);
    Ok(crate::writer::format_checksum(xxhash_rust::xxh3::xxh3_64(
        &text,
    )))
}

impl Checkpoint {
    /// Opens a checkpoint directory, parsing and validating every weight file's header and, for
    /// sharded checkpoints, that the index and the shards agree.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let w = weight_files(dir)?;
        let mut tensors: BTreeMap<String, TensorLoc> = BTreeMap::new();
        for (file_index, path) in w.files.iter().enumerate() {
            let f = crate::fsutil::open_regular(path)?;
            let found: Vec<crate::torch_bin::BinTensor> = match w.format {
                WeightFormat::Safetensors => {
                    let h = read_safetensors_header(path, &f)?;
                    let base = h.data_offset();
                    h.tensors
                        .into_iter()
                        .map(|t| crate::torch_bin::BinTensor {
                            name: t.name,
                            dtype: t.dtype,
                            shape: t.shape,
                            offset: base + t.start,
                            len: t.end - t.start,
                        })
                        .collect()
                }
                WeightFormat::PyTorch => crate::torch_bin::read_torch_bin(path, &f)?,
            };
            for t in found {
                if let Some(prev) = tensors.get(&t.name) {
                    return Err(SplitError::DuplicateTensor {
                        tensor: t.name,
                        first: prev.file.clone(),
                        second: path.clone(),
                    });
                }
                let loc = TensorLoc {
                    name: t.name.clone(),
                    file: path.clone(),
                    file_index,
                    dtype: t.dtype,
                    shape: t.shape,
                    offset: t.offset,
                    len: t.len,
                };
                tensors.insert(t.name, loc);
            }
        }
        if let Some(index) = &w.index {
            for (tensor, shard) in &w.weight_map {
                let in_shard = tensors
                    .get(tensor)
                    .is_some_and(|l| l.file.file_name().is_some_and(|n| n == shard.as_str()));
                if !in_shard {
                    return Err(SplitError::TensorNotInShard {
                        index: index.clone(),
                        tensor: tensor.clone(),
                        shard: shard.clone(),
                    });
                }
            }
        }
        let handles = w.files.iter().map(|_| OnceLock::new()).collect();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files: w.files,
            index: w.index,
            format: w.format,
            tensors,
            handles,
        })
    }

    /// Looks a tensor up by its full name.
    pub fn tensor(&self, name: &str) -> Option<&TensorLoc> {
        self.tensors.get(name)
    }

    /// Opens a checkpoint for `layout`: [`Checkpoint::open`], then every tensor the layout
    /// says is stacked replaced by its parts ([`crate::layout::Stacked`]).
    pub fn open_for(dir: &Path, layout: &crate::layout::Layout) -> Result<Checkpoint> {
        let mut ckpt = Checkpoint::open(dir)?;
        ckpt.unstack(layout)?;
        Ok(ckpt)
    }

    /// Replaces each stacked tensor of `layout` present here by its parts: row `e` of its first
    /// dimension is the tensor `parts[e]`, a contiguous sub-range of the same bytes.
    pub fn unstack(&mut self, layout: &crate::layout::Layout) -> Result<()> {
        for s in &layout.stacked {
            let Some(name) = layout.find(&s.tensor, |n| {
                self.tensors.contains_key(n).then(|| n.to_string())
            }) else {
                continue;
            };
            let loc = self.tensors.remove(&name).expect("found above");
            let rows = s.parts.len();
            let expected = layout.shapes.get(&s.tensor);
            let fits = loc.shape.first() == Some(&rows)
                && rows > 0
                && loc.len.is_multiple_of(rows as u64)
                && expected.is_none_or(|e| *e == loc.shape);
            if !fits {
                return Err(SplitError::TensorShape {
                    file: loc.file.clone(),
                    tensor: loc.name.clone(),
                    found: loc.shape.clone(),
                    expected: expected.cloned().unwrap_or_else(|| {
                        std::iter::once(rows)
                            .chain(loc.shape.iter().skip(1).copied())
                            .collect()
                    }),
                });
            }
            let stride = loc.len / rows as u64;
            for (e, part) in s.parts.iter().enumerate() {
                let piece = TensorLoc {
                    name: part.clone(),
                    shape: loc.shape[1..].to_vec(),
                    offset: loc.offset + e as u64 * stride,
                    len: stride,
                    ..loc.clone()
                };
                if self.tensors.insert(part.clone(), piece).is_some() {
                    return Err(SplitError::InvalidLayout {
                        architecture: layout.architecture.clone(),
                        reason: format!("{part} is both a checkpoint tensor and a part of {name}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// All tensors, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorLoc> {
        self.tensors.values()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn handle(&self, file_index: usize) -> Result<&File> {
        if let Some(f) = self.handles[file_index].get() {
            return Ok(f);
        }
        let path = &self.files[file_index];
        let f = crate::fsutil::open_regular(path)?;
        crate::fsutil::advise_sequential(&f);
        Ok(self.handles[file_index].get_or_init(|| f))
    }

    /// Reads a whole tensor's raw bytes into `buf` (resized to fit, allocation reused).
    pub fn read_tensor(&self, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        let loc = self.tensor(name).ok_or_else(|| SplitError::NoSuchTensor {
            dir: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        buf.clear();
        buf.resize(loc.len as usize, 0);
        self.read_range(loc, 0, buf)
    }

    /// Reads `buf.len()` bytes of a tensor starting `start` bytes into it (for chunked copies).
    pub fn read_range(&self, loc: &TensorLoc, start: u64, buf: &mut [u8]) -> Result<()> {
        if start + buf.len() as u64 > loc.len {
            return Err(SplitError::BadTensor {
                file: loc.file.clone(),
                tensor: loc.name.clone(),
                reason: format!(
                    "read of {} bytes at {start} is past the tensor's {} bytes",
                    buf.len(),
                    loc.len
                ),
            });
        }
        let f = self.handle(loc.file_index)?;
        f.read_exact_at(buf, loc.offset + start).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                SplitError::Truncated {
                    file: loc.file.clone(),
                    expected: loc.offset + loc.len,
                    actual: f.metadata().map(|m| m.len()).unwrap_or(0),
                }
            } else {
                SplitError::io(&loc.file, e)
            }
        })
    }

    /// The checkpoint's fingerprint (see [`source_fingerprint`]).
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint_of(&self.dir, &self.files, self.index.as_deref())
    }
}
