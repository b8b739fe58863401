//! Parsing and validating the header of one safetensors file (shared by the checkpoint reader
//! and the split's integrity checks).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::dtype::{numel, Dtype};
use crate::error::{Result, SplitError};
use crate::writer::MAX_HEADER_LEN;

/// One tensor entry of a parsed safetensors header (offsets relative to the data region).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone)]
pub(crate) struct RawHeader {
    /// Value of the 8-byte length prefix.
    pub header_len: u64,
    /// `__metadata__`, if any.
    pub metadata: BTreeMap<String, String>,
    /// Tensors sorted by data offset.
    pub tensors: Vec<RawTensor>,
}

impl RawHeader {
    /// Absolute offset of the data region.
    pub fn data_offset(&self) -> u64 {
        8 + self.header_len
    }
}

/// Reads and fully validates the header of a safetensors file: sane length, JSON, known dtypes,
/// shapes matching byte ranges, contiguous non-overlapping data that exactly fills the file.
pub(crate) fn read_safetensors_header(path: &Path, file: &File) -> Result<RawHeader> {
    let bad = |reason: String| SplitError::BadHeader {
        file: path.to_path_buf(),
        reason,
    };
    let file_len = file.metadata().map_err(|e| SplitError::io(path, e))?.len();
    if file_len < 8 {
        return Err(SplitError::Truncated {
            file: path.to_path_buf(),
            expected: 8,
            actual: file_len,
        });
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|e| SplitError::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length field says {header_len} bytes, more than the {MAX_HEADER_LEN}-byte limit \
             (not a safetensors file?)"
        )));
    }
    if 8 + header_len > file_len {
        return Err(bad(format!(
            "header length field says {header_len} bytes but the whole file is only {file_len} bytes"
        )));
    }
    let mut hbuf = vec![0u8; header_len as usize];
    file.read_exact_at(&mut hbuf, 8)
        .map_err(|e| SplitError::io(path, e))?;
    let text = std::str::from_utf8(&hbuf).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    if !text.trim_start().starts_with('{') {
        return Err(bad("header is not a JSON object".into()));
    }
    let json: crate::jsonutil::Entries =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    drop(hbuf);
    if let Some(name) = json.first_duplicate() {
        return Err(SplitError::BadTensor {
            file: path.to_path_buf(),
            tensor: name.to_string(),
            reason: "appears twice in the header (a tensor name must be unique)".into(),
        });
    }

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(json.0.len());
    for (name, v) in json.0 {
        if name == "__metadata__" {
            let obj = v
                .as_object()
                .ok_or_else(|| bad("__metadata__ is not an object".into()))?;
            for (k, val) in obj {
                let s = val
                    .as_str()
                    .ok_or_else(|| bad(format!("__metadata__ value for {k:?} is not a string")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad_t = |reason: String| SplitError::BadTensor {
            file: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let obj = v
            .as_object()
            .ok_or_else(|| bad_t("header entry is not an object".into()))?;
        let dtype_str = obj
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad_t("no \"dtype\" string".into()))?;
        let dtype: Dtype = dtype_str.parse().map_err(|_| SplitError::UnknownDtype {
            file: path.to_path_buf(),
            tensor: name.clone(),
            dtype: dtype_str.to_string(),
        })?;
        let shape = obj
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad_t("no \"shape\" array".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad_t("shape has a non-integer dimension".into()))?;
        let offs = obj
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| match a.as_slice() {
                [s, e] => Some((s.as_u64()?, e.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| bad_t("no \"data_offsets\" pair of integers".into()))?;
        let (start, end) = offs;
        if end < start {
            return Err(bad_t(format!(
                "data_offsets [{start}, {end}] end before they start"
            )));
        }
        let expected = numel(&shape)
            .and_then(|n| dtype.byte_len(n))
            .ok_or_else(|| {
                bad_t(format!(
                    "shape {shape:?} of {dtype} is not a whole number of bytes"
                ))
            })?;
        if end - start != expected {
            return Err(bad_t(format!(
                "data_offsets [{start}, {end}] span {} bytes but shape {shape:?} of {dtype} needs {expected}",
                end - start
            )));
        }
        tensors.push(RawTensor {
            name,
            dtype,
            shape,
            start,
            end,
        });
    }
    tensors.sort_by_key(|a| (a.start, a.end));

    let data_len = file_len - 8 - header_len;
    let mut pos = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let bad_t = |reason: String| SplitError::BadTensor {
            file: path.to_path_buf(),
            tensor: t.name.clone(),
            reason,
        };
        if t.start < pos {
            let other = &tensors[i - 1].name;
            return Err(bad_t(format!(
                "data_offsets [{}, {}] overlap those of tensor {other}",
                t.start, t.end
            )));
        }
        if t.start > pos {
            if t.end > data_len {
                return Err(bad_t(format!(
                    "data_offsets [{}, {}] are out of range: the data region has {data_len} bytes",
                    t.start, t.end
                )));
            }
            return Err(bad_t(format!(
                "data_offsets [{}, {}] leave a gap of {} bytes before it (safetensors data must be contiguous)",
                t.start,
                t.end,
                t.start - pos
            )));
        }
        pos = t.end;
    }
    let expected = 8 + header_len + pos;
    if expected > file_len {
        return Err(SplitError::Truncated {
            file: path.to_path_buf(),
            expected,
            actual: file_len,
        });
    }
    if expected < file_len {
        return Err(bad(format!(
            "{} unexpected bytes after the last tensor (header describes {expected} bytes, file has {file_len})",
            file_len - expected
        )));
    }
    Ok(RawHeader {
        header_len,
        metadata,
        tensors,
    })
}
