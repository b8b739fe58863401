//! Reading a PyTorch checkpoint (`pytorch_model.bin`, or a shard of one) as byte ranges, without
//! running Python.
//!
//! `torch.save` (since torch 1.6) writes a zip archive: `<archive>/data.pkl`, the pickled state
//! dict, whose tensors name their storages by key; `<archive>/data/<key>`, each storage's raw
//! little-endian elements in an entry stored uncompressed; plus small records (`version`,
//! `byteorder`, ...). The pickle is read by [`crate::torch_pickle`], which executes nothing;
//! each tensor then becomes the byte range of its elements inside its storage's entry, read
//! later with positioned reads like a safetensors tensor. Several tensors may share a storage
//! (tied weights, views): their ranges may overlap, which is fine for reading.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::dtype::{numel, Dtype};
use crate::error::{Result, SplitError};
use crate::torch_pickle::{read_state_dict, PickleError, TensorRef};

/// Largest `data.pkl` accepted: a state dict's pickle is a few hundred bytes per tensor, so
/// this is far beyond any real checkpoint and keeps a corrupt size field from allocating much.
const MAX_PICKLE_LEN: u64 = 256 << 20;

/// The start of a legacy (torch < 1.6) checkpoint: pickle protocol 2, then the magic number
/// `0x1950a86a20f9469cfc6c` as a 10-byte LONG1.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// One tensor of a PyTorch checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BinTensor {
    /// Tensor name (state dict key).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Where a storage's bytes are in the file.
#[derive(Debug, Clone, Copy)]
struct Record {
    start: u64,
    len: u64,
}

/// Reads the tensors of the `torch.save` zip archive `file` (at `path`), in the pickle's order.
pub(crate) fn read_torch_bin(path: &Path, file: &File) -> Result<Vec<BinTensor>> {
    let bad = |reason: String| SplitError::BadTorchFile {
        file: path.to_path_buf(),
        reason,
    };
    let file_len = file.metadata().map_err(|e| SplitError::io(path, e))?.len();
    let mut head = [0u8; LEGACY_MAGIC.len()];
    let n = (file_len as usize).min(head.len());
    file.read_exact_at(&mut head[..n], 0)
        .map_err(|e| SplitError::io(path, e))?;
    if head[..n].starts_with(&LEGACY_MAGIC) {
        return Err(SplitError::LegacyTorchFormat {
            file: path.to_path_buf(),
        });
    }
    if !head[..n].starts_with(b"PK\x03\x04") {
        return Err(bad(format!(
            "not a zip archive as torch.save writes (it starts with bytes {:02x?})",
            &head[..n.min(4)]
        )));
    }
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        bad(format!(
            "not a readable zip archive ({e}); is the file truncated (incomplete download)?"
        ))
    })?;

    let prefix = archive_prefix(&zip).map_err(bad)?;
    let byteorder = format!("{prefix}/byteorder");
    if let Some(order) = read_small_record(&mut zip, &byteorder, 16, path)? {
        if order != b"little" {
            return Err(bad(format!(
                "{byteorder} says {:?}: only little-endian checkpoints can be read",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pkl_name = format!("{prefix}/data.pkl");
    let pkl = read_small_record(&mut zip, &pkl_name, MAX_PICKLE_LEN, path)?
        .ok_or_else(|| bad(format!("no {pkl_name} record")))?;
    let dict = read_state_dict(&pkl).map_err(|e| match e {
        PickleError::Forbidden(global) => SplitError::ForbiddenGlobal {
            file: path.to_path_buf(),
            global,
        },
        PickleError::Bad(reason) => bad(format!("{pkl_name}: {reason}")),
    })?;
    drop(pkl);

    let mut records: HashMap<String, Record> = HashMap::new();
    let mut out = Vec::with_capacity(dict.len());
    for (name, t) in dict {
        let key = &t.storage.key;
        let record = match records.get(key) {
            Some(r) => *r,
            None => {
                let r = storage_record(&mut zip, &prefix, key, file_len, path)?;
                records.insert(key.clone(), r);
                r
            }
        };
        out.push(locate(path, &prefix, name, &t, record)?);
    }
    Ok(out)
}

/// The archive's top directory: torch writes every record under `<archive>/`, `data.pkl` first.
fn archive_prefix(zip: &zip::ZipArchive<BufReader<&File>>) -> std::result::Result<String, String> {
    let mut found = zip
        .file_names()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|p| !p.is_empty() && !p.contains('/'));
    match (found.next(), found.next()) {
        (Some(p), None) => Ok(p.to_string()),
        (None, _) => Err("no <archive>/data.pkl record: not a torch.save checkpoint".into()),
        (Some(a), Some(b)) => Err(format!(
            "two pickles ({a}/data.pkl and {b}/data.pkl): not a single torch.save checkpoint"
        )),
    }
}

/// The entry `name`, checked to be stored uncompressed and unencrypted, as `(index, data start,
/// size)`; `None` when the archive has no such entry.
fn stored_entry(
    zip: &mut zip::ZipArchive<BufReader<&File>>,
    name: &str,
    path: &Path,
) -> Result<Option<(usize, u64, u64)>> {
    let bad = |reason: String| SplitError::BadTorchFile {
        file: path.to_path_buf(),
        reason,
    };
    let Some(index) = zip.index_for_name(name) else {
        return Ok(None);
    };
    let entry = zip
        .by_index_raw(index)
        .map_err(|e| bad(format!("record {name}: {e}")))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(bad(format!(
            "record {name} is compressed ({}); torch.save stores records uncompressed, so the \
             archive was rewritten by another tool: re-save it with torch.save or convert it to \
             safetensors",
            method_name(entry.compression())
        )));
    }
    if entry.encrypted() {
        return Err(bad(format!("record {name} is encrypted")));
    }
    if entry.compressed_size() != entry.size() {
        return Err(bad(format!(
            "record {name} is stored uncompressed but its sizes disagree ({} and {} bytes)",
            entry.compressed_size(),
            entry.size()
        )));
    }
    Ok(Some((index, entry.data_start(), entry.size())))
}

/// A zip compression method as people know it (the zip crate, built without compression
/// support, calls them all `Unsupported(n)`).
fn method_name(m: zip::CompressionMethod) -> String {
    use zip::CompressionMethod as C;
    let known = [
        (C::DEFLATE, "deflate"),
        (C::DEFLATE64, "deflate64"),
        (C::BZIP2, "bzip2"),
        (C::LZMA, "lzma"),
        (C::ZSTD, "zstd"),
        (C::XZ, "xz"),
    ];
    match known.iter().find(|(c, _)| *c == m) {
        Some((_, name)) => name.to_string(),
        None => format!("method {m:?}"),
    }
}

/// Reads a small record whole (checking its CRC), `None` when the archive has none.
fn read_small_record(
    zip: &mut zip::ZipArchive<BufReader<&File>>,
    name: &str,
    limit: u64,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    let bad = |reason: String| SplitError::BadTorchFile {
        file: path.to_path_buf(),
        reason,
    };
    let Some((index, _, size)) = stored_entry(zip, name, path)? else {
        return Ok(None);
    };
    if size > limit {
        return Err(bad(format!(
            "record {name} is {size} bytes, more than the {limit} a checkpoint's can be"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    zip.by_index(index)
        .and_then(|e| Ok(e.take(limit).read_to_end(&mut bytes)?))
        .map_err(|e| {
            bad(format!(
                "record {name} cannot be read ({e}); is the file truncated or corrupt?"
            ))
        })?;
    Ok(Some(bytes))
}

/// Where the storage `key` is: its record, which must exist and lie inside the file.
fn storage_record(
    zip: &mut zip::ZipArchive<BufReader<&File>>,
    prefix: &str,
    key: &str,
    file_len: u64,
    path: &Path,
) -> Result<Record> {
    let name = format!("{prefix}/data/{key}");
    let Some((_, start, len)) = stored_entry(zip, &name, path)? else {
        return Err(SplitError::BadTorchFile {
            file: path.to_path_buf(),
            reason: format!("data.pkl refers to storage {key}, but there is no record {name}"),
        });
    };
    let end = start.saturating_add(len);
    if end > file_len {
        return Err(SplitError::Truncated {
            file: path.to_path_buf(),
            expected: end,
            actual: file_len,
        });
    }
    Ok(Record { start, len })
}

/// Whether a tensor of `shape` with `stride` is laid out row-major without gaps, as torch's
/// `is_contiguous` decides: dimensions of size 1 may have any stride, empty tensors always are.
fn is_contiguous(shape: &[u64], stride: &[u64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 {
            if s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
    }
    true
}

/// The byte range of tensor `name` inside its storage's record.
fn locate(
    path: &Path,
    prefix: &str,
    name: String,
    t: &TensorRef,
    rec: Record,
) -> Result<BinTensor> {
    let bad_t = |reason: String| SplitError::BadTensor {
        file: path.to_path_buf(),
        tensor: name.clone(),
        reason,
    };
    if !is_contiguous(&t.shape, &t.stride) {
        return Err(bad_t(format!(
            "is not contiguous (shape {:?}, stride {:?}: a transposed or strided view); save \
             it with .contiguous() or convert the checkpoint to safetensors",
            t.shape, t.stride
        )));
    }
    let shape = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad_t(format!("shape {:?} is too large", t.shape)))?;
    let key = &t.storage.key;
    let too_big = || {
        bad_t(format!(
            "shape {:?} and storage offset {} overflow",
            t.shape, t.offset
        ))
    };
    let len = numel(&shape)
        .and_then(|n| t.dtype.byte_len(n))
        .ok_or_else(too_big)?;
    let storage_len = t
        .storage
        .dtype
        .byte_len(t.storage.numel)
        .ok_or_else(too_big)?;
    if storage_len > rec.len {
        return Err(SplitError::BadTorchFile {
            file: path.to_path_buf(),
            reason: format!(
                "record {prefix}/data/{key} holds {} bytes, but data.pkl says its storage has {} \
                 elements of {} ({storage_len} bytes)",
                rec.len, t.storage.numel, t.storage.dtype
            ),
        });
    }
    if len == 0 {
        return Ok(BinTensor {
            name,
            dtype: t.dtype,
            shape,
            offset: rec.start,
            len: 0,
        });
    }
    let start = t.dtype.byte_len(t.offset).ok_or_else(too_big)?;
    let end = start.checked_add(len).ok_or_else(too_big)?;
    if end > storage_len {
        return Err(bad_t(format!(
            "needs bytes {start}..{end} of storage {key}, which has only {storage_len} bytes"
        )));
    }
    Ok(BinTensor {
        name,
        dtype: t.dtype,
        shape,
        offset: rec.start + start,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::is_contiguous;

    #[test]
    fn contiguity_is_torch_s() {
        assert!(is_contiguous(&[], &[]));
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        // Size-1 dimensions do not count, empty tensors are contiguous whatever the strides.
        assert!(is_contiguous(&[1, 3], &[1, 1]));
        assert!(is_contiguous(&[0, 3], &[7, 9]));
        assert!(!is_contiguous(&[2, 2], &[2, 2]));
        assert!(!is_contiguous(&[4], &[0]));
    }
}
