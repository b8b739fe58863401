//! The embedding and LM-head matrices when the device budget cannot hold them (a 70B model's are
//! 2.1 GB each in bf16, more than half of a 4 GB card): the matrix stays in its split file,
//! mapped, and is used in place on the host.
//!
//! - Embedding lookup: the rows of the batch's ids are gathered on the host (a few KB per token)
//!   and only the hidden states go to the device.
//! - LM head: the rows are walked in chunks of at most `chunk_rows`; each chunk goes to the device
//!   (or is viewed in place on the CPU), is multiplied, and its pages are released again, so the
//!   LM head costs one chunk of memory, not the whole matrix.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rabbit_split::manifest::UnitEntry;
use rabbit_split::{FileId, UnitRegion};
use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::weights::kind_of;

/// A `[rows, cols]` matrix viewed in a mapped split file (or original shard).
pub struct MappedMatrix {
    map: memmap2::Mmap,
    /// Byte offset of the tensor inside the mapping.
    offset: usize,
    stored: Kind,
    elem: usize,
    rows: i64,
    cols: i64,
    path: PathBuf,
    /// An original shard streamed in place: the file and its (size, mtime) when mapped, checked
    /// before every use (a file cut short under a mapping would kill the process with SIGBUS).
    guard: Option<(std::fs::File, FileId)>,
}

fn stamp(f: &std::fs::File, path: &Path) -> Result<FileId> {
    let md = f.metadata().map_err(|e| CoreError::io(path, e))?;
    Ok(rabbit_split::FileStamp::id_of(&md))
}

impl MappedMatrix {
    /// Maps tensor `name` of `entry` (a unit of the split in `dir`). Quantized tensors cannot be
    /// used this way (their rows are not stored as rows).
    pub fn open(dir: &Path, entry: &UnitEntry, name: &str) -> Result<Arc<MappedMatrix>> {
        Self::open_in(&UnitRegion::of_split_unit(dir, entry), entry, name, false)
    }

    /// Maps tensor `name` of `entry`, whose bytes come from `region` (`original`: a shard
    /// streamed in place, checked for changes before every use).
    pub fn open_in(
        region: &UnitRegion,
        entry: &UnitEntry,
        name: &str,
        original: bool,
    ) -> Result<Arc<MappedMatrix>> {
        let first = region.extents.first().map(|e| e.file.clone());
        let bad = |reason: String| CoreError::BadTensor {
            file: first.clone().unwrap_or_else(|| entry.file.clone().into()),
            tensor: name.to_string(),
            reason,
        };
        if entry.quantized.iter().any(|q| q.name == name) {
            return Err(CoreError::InvalidInput(format!(
                "{}: `{name}` is compressed (--compress-embeddings) and cannot be streamed from the \
                 split; give the device budget room for it or split without --compress-embeddings",
                entry.file
            )));
        }
        let t = entry
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| bad("missing from its unit (the split or the checkpoint)".into()))?;
        let stored = kind_of(t.dtype)
            .filter(|k| matches!(k, Kind::Float | Kind::BFloat16 | Kind::Half))
            .ok_or_else(|| bad(format!("dtype {} cannot hold weights", t.dtype.name())))?;
        if t.shape.len() != 2 {
            return Err(bad(format!("shape {:?} is not a matrix", t.shape)));
        }
        let elem = t.dtype.size_bytes();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        if (rows * cols * elem) as u64 != t.len {
            return Err(bad(format!("{} bytes for shape {:?}", t.len, t.shape)));
        }
        let (extent, at) = region
            .locate(t.offset, t.len)
            .ok_or_else(|| bad("its bytes lie outside the unit's data".into()))?;
        let path = extent.file.clone();
        if !at.is_multiple_of(elem as u64) {
            return Err(CoreError::BadTensor {
                file: path,
                tensor: name.to_string(),
                reason: format!(
                    "stored at byte {at}, not aligned for {} (an old safetensors writer): it \
                     cannot be used in place; split the model, or give the device budget room \
                     for it",
                    t.dtype.name()
                ),
            });
        }
        let file = rabbit_split::fsutil::open_regular(&path)?;
        let file_len = file.metadata().map_err(|e| CoreError::io(&path, e))?.len();
        if file_len < at + t.len {
            return Err(CoreError::truncated_file(&path, original));
        }
        let page = rustix::param::page_size().max(1) as u64;
        let start = at / page * page;
        // SAFETY: split files are written once (tmp + rename) and never modified in place;
        // original shards are checked for changes before every use (`guard`).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len((at - start + t.len) as usize)
                .map(&file)
        }
        .map_err(|e| CoreError::io(&path, e))?;
        let guard = if original {
            let s = stamp(&file, &path)?;
            Some((file, s))
        } else {
            None
        };
        Ok(Arc::new(MappedMatrix {
            map,
            offset: (at - start) as usize,
            stored,
            elem,
            rows: rows as i64,
            cols: cols as i64,
            path,
            guard,
        }))
    }

    /// Fails when an original shard changed since it was mapped.
    fn check(&self) -> Result<()> {
        if let Some((f, s)) = &self.guard {
            if stamp(f, &self.path)? != *s {
                return Err(CoreError::SourceChanged {
                    path: self.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// Columns of the matrix (the hidden size).
    pub fn cols(&self) -> i64 {
        self.cols
    }

    /// A CPU view of rows `start..start + n` (stored dtype). Must not outlive `self`.
    fn view(&self, start: i64, n: i64) -> Result<Tensor> {
        let at = self.offset + (start * self.cols) as usize * self.elem;
        // SAFETY: the range lies inside the mapping (checked at open; callers stay within
        // `rows`), the tensor is aligned for its dtype (checked at open), and the view is
        // dropped before `self`.
        Ok(unsafe {
            Tensor::f_from_blob(
                self.map.as_ptr().add(at),
                &[n, self.cols],
                &[],
                self.stored,
                Device::Cpu,
            )?
        })
    }

    /// Releases the pages of rows `start..start + n` from this process (they stay in the page
    /// cache), so walking the matrix never piles it up in RSS.
    fn release(&self, start: i64, n: i64) {
        let page = 4096usize;
        let from = self.offset + (start * self.cols) as usize * self.elem;
        let to = from + (n * self.cols) as usize * self.elem;
        // Whole pages inside the range only (a page shared with a neighbouring chunk stays).
        let a = from.div_ceil(page) * page;
        let b = to / page * page;
        if b > a {
            // SAFETY: the range lies inside our own read-only file mapping, and no view of it
            // outlives this call (the chunk was copied out); with MADV_DONTNEED the next access
            // simply faults the pages in again from the file. Failure only means they stay.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }

    /// Embedding lookup on the host: `ids` (any shape, any device) → `[..ids, cols]` on `device`
    /// in `kind`.
    pub fn embed(&self, ids: &Tensor, device: Device, kind: Kind) -> Result<Tensor> {
        self.check()?;
        let flat = ids.f_to_device(Device::Cpu)?.f_reshape([-1])?;
        let (lo, hi) = (
            flat.f_min()?.int64_value(&[]),
            flat.f_max()?.int64_value(&[]),
        );
        if lo < 0 || hi >= self.rows {
            return Err(CoreError::InvalidInput(format!(
                "{}: token id {} is outside the embedding's {} rows",
                self.path.display(),
                if lo < 0 { lo } else { hi },
                self.rows
            )));
        }
        let rows = self.view(0, self.rows)?.f_index_select(0, &flat)?;
        let mut shape = ids.size();
        shape.push(self.cols);
        Ok(rows
            .f_to_device(device)?
            .f_to_kind(kind)?
            .f_reshape(shape.as_slice())?)
    }

    /// `h @ M^T` for `h` `[.., cols]` on `device`, walking the rows in chunks of `chunk_rows`:
    /// `[.., rows]` logits in `kind`. With `normalize_rows`, each row is first divided by its L2
    /// norm (Baichuan's NormHead; rows are independent, so chunk by chunk is exact).
    pub fn linear_chunked(
        &self,
        h: &Tensor,
        chunk_rows: i64,
        device: Device,
        kind: Kind,
        normalize_rows: bool,
    ) -> Result<Tensor> {
        self.check()?;
        let chunk_rows = chunk_rows.max(1);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < self.rows {
            let n = chunk_rows.min(self.rows - start);
            let w = self.view(start, n)?;
            let w = if device == Device::Cpu && self.stored == kind {
                w
            } else {
                w.f_to_device(device)?.f_to_kind(kind)?
            };
            let w = if normalize_rows {
                normalize_rows_l2(&w)?
            } else {
                w
            };
            parts.push(h.f_linear::<Tensor>(&w, None)?);
            drop(w);
            self.release(start, n);
            start += n;
        }
        Ok(Tensor::f_cat(&parts, -1)?)
    }
}

/// Each row of `w` divided by its L2 norm (at least 1e-12), in `w`'s dtype, as
/// `torch.nn.functional.normalize(w, dim=1)` (Baichuan 2's NormHead) computes it.
pub fn normalize_rows_l2(w: &Tensor) -> Result<Tensor> {
    let norm = w
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(w.f_div(&norm)?)
}
