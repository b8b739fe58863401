//! Streaming writer for safetensors files whose data region starts at an aligned offset.
//!
//! The header is padded with spaces (still valid JSON, still a valid safetensors file) so the
//! data region begins at a multiple of the alignment; a reader can then fetch all tensors with one
//! aligned sequential read (or O_DIRECT) and view them in place. Data is streamed in: the writer
//! never holds more than a small write buffer, and it hashes the bytes as they pass so the
//! checksum costs no second read.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::dtype::{numel, Dtype};
use crate::error::{Result, SplitError};
use crate::fsutil;

/// Name, dtype and shape of one tensor to write (its bytes arrive later through
/// [`AlignedWriter::write_data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    /// Tensor name as it will appear in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
}

impl TensorHeader {
    /// Size of the tensor's data in bytes, `None` if not a whole number of bytes or overflowing.
    pub fn byte_len(&self) -> Option<u64> {
        self.dtype.byte_len(numel(&self.shape)?)
    }
}

/// The serialized header of a file and where each tensor's bytes go, computed before writing so
/// callers (the splitter's plan) know the exact file size and can compare headers byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderLayout {
    /// The first `data_offset` bytes of the file: 8-byte little-endian length, JSON, padding.
    pub bytes: Vec<u8>,
    /// Absolute offset of the data region (a multiple of the alignment).
    pub data_offset: u64,
    /// Length of the data region (sum of all tensor sizes; tensors are contiguous).
    pub data_len: u64,
    /// `(start, end)` of each tensor relative to `data_offset`, in the given order.
    pub offsets: Vec<(u64, u64)>,
}

impl HeaderLayout {
    /// Total size of the file.
    pub fn file_size(&self) -> u64 {
        self.data_offset + self.data_len
    }
}

/// Largest header the safetensors crate accepts.
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// Checks that `alignment` is usable: a power of two of at least 8 (so every dtype ends up
/// naturally aligned) and at most 1 GiB.
pub fn check_alignment(alignment: u64) -> Result<()> {
    if !alignment.is_power_of_two() || !(8..=1 << 30).contains(&alignment) {
        return Err(SplitError::InvalidOptions {
            reason: format!(
                "alignment must be a power of two between 8 and 1 GiB, got {alignment}"
            ),
        });
    }
    Ok(())
}

/// Lays out a safetensors header: tensors contiguous in the given order, JSON padded with
/// trailing spaces so that the data region starts at a multiple of `alignment`. `file` is only
/// used in error messages. An empty `metadata` omits `__metadata__`.
pub fn build_header(
    file: &Path,
    tensors: &[TensorHeader],
    metadata: &BTreeMap<String, String>,
    alignment: u64,
) -> Result<HeaderLayout> {
    check_alignment(alignment)?;
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut json = String::with_capacity(64 + tensors.len() * 96);
    json.push('{');
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("string map serializes"));
        first = false;
    }
    let mut pos = 0u64;
    for t in tensors {
        let bad = |reason: &str| SplitError::BadTensor {
            file: file.to_path_buf(),
            tensor: t.name.clone(),
            reason: reason.to_string(),
        };
        if t.name == "__metadata__" {
            return Err(bad("the name __metadata__ is reserved by safetensors"));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(bad("tensor name appears twice"));
        }
        let len = t
            .byte_len()
            .ok_or_else(|| bad("shape does not amount to a whole number of bytes"))?;
        let end = pos
            .checked_add(len)
            .ok_or_else(|| bad("file size overflows"))?;
        offsets.push((pos, end));
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(&t.name).expect("string serializes"));
        json.push_str(":{\"dtype\":\"");
        json.push_str(t.dtype.name());
        json.push_str("\",\"shape\":");
        json.push_str(&serde_json::to_string(&t.shape).expect("shape serializes"));
        json.push_str(&format!(",\"data_offsets\":[{pos},{end}]}}"));
        pos = end;
    }
    json.push('}');
    let unpadded = 8 + json.len() as u64;
    let data_offset = unpadded.next_multiple_of(alignment);
    let header_len = data_offset - 8;
    if header_len > MAX_HEADER_LEN {
        return Err(SplitError::BadHeader {
            file: file.to_path_buf(),
            reason: format!("header would be {header_len} bytes, over the safetensors limit"),
        });
    }
    let mut bytes = Vec::with_capacity(data_offset as usize);
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(data_offset as usize, b' ');
    Ok(HeaderLayout {
        bytes,
        data_offset,
        data_len: pos,
        offsets,
    })
}

/// A file written and durably renamed into place by [`AlignedWriter::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Final path.
    pub path: PathBuf,
    /// File size in bytes.
    pub size: u64,
    /// `xxh3:` + 16 hex digits: XXH3-64 of the whole file, header included.
    pub checksum: String,
}

/// Formats an XXH3-64 digest the way manifests store it.
pub fn format_checksum(digest: u64) -> String {
    format!("xxh3:{digest:016x}")
}

const WRITE_BUF: usize = 1 << 20;

/// Streams one safetensors file to a temporary file next to its final path (an
/// [`fsutil::AtomicFile`]), then fsyncs and renames it into place.
///
/// Dropping it before [`finish`](Self::finish) removes the temporary file, so an error anywhere
/// never leaves a complete-looking file behind.
pub struct AlignedWriter {
    final_path: PathBuf,
    file: fsutil::AtomicFile,
    buf: Vec<u8>,
    hasher: Box<Xxh3>,
    layout: HeaderLayout,
    data_written: u64,
}

impl std::fmt::Debug for AlignedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedWriter")
            .field("final_path", &self.final_path)
            .field("data_written", &self.data_written)
            .field("data_len", &self.layout.data_len)
            .finish()
    }
}

impl AlignedWriter {
    /// Creates the temporary file, reserves the file's space and writes the padded header. Tensors are laid out contiguously in the order given.
    pub fn create(
        final_path: &Path,
        tensors: Vec<TensorHeader>,
        metadata: BTreeMap<String, String>,
        alignment: u64,
    ) -> Result<AlignedWriter> {
        let layout = build_header(final_path, &tensors, &metadata, alignment)?;
        Self::with_layout(final_path, layout)
    }

    /// Like [`create`](Self::create) with a header already laid out by [`build_header`].
    pub fn with_layout(final_path: &Path, layout: HeaderLayout) -> Result<AlignedWriter> {
        let file = fsutil::AtomicFile::create(final_path)?;
        let mut w = AlignedWriter {
            final_path: final_path.to_path_buf(),
            file,
            buf: Vec::with_capacity(WRITE_BUF),
            hasher: Box::new(Xxh3::new()),
            layout,
            data_written: 0,
        };
        fsutil::preallocate(w.file.file(), w.layout.file_size())
            .map_err(|e| SplitError::io(w.file.tmp_path(), e))?;
        let header = std::mem::take(&mut w.layout.bytes);
        w.hasher.update(&header);
        let res = w.write_raw(&header);
        w.layout.bytes = header;
        res?;
        Ok(w)
    }

    /// The header layout (offsets of every tensor, data region).
    pub fn layout(&self) -> &HeaderLayout {
        &self.layout
    }

    /// Absolute offset of the data region.
    pub fn data_offset(&self) -> u64 {
        self.layout.data_offset
    }

    /// Path of the temporary file being written.
    pub fn tmp_path(&self) -> &Path {
        self.file.tmp_path()
    }

    /// Appends the next bytes of tensor data (tensors in order; a tensor may arrive in any
    /// number of chunks).
    pub fn write_data(&mut self, bytes: &[u8]) -> Result<()> {
        let left = self.layout.data_len - self.data_written;
        if bytes.len() as u64 > left {
            return Err(SplitError::WriterMisuse {
                file: self.final_path.clone(),
                reason: format!(
                    "{} bytes of tensor data given but only {left} remain of {}",
                    bytes.len(),
                    self.layout.data_len
                ),
            });
        }
        self.hasher.update(bytes);
        self.data_written += bytes.len() as u64;
        if self.buf.len() + bytes.len() > WRITE_BUF {
            self.flush_buf()?;
        }
        if bytes.len() >= WRITE_BUF {
            self.write_raw(bytes)
        } else {
            self.buf.extend_from_slice(bytes);
            Ok(())
        }
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let res = self.write_raw(&buf);
        self.buf = buf;
        self.buf.clear();
        res
    }

    fn write_raw(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let res = crate::testing::allowed(bytes.len())
                .and_then(|n| self.file.file().write(&bytes[..n]));
            match res {
                Ok(0) => {
                    return Err(SplitError::io(
                        self.file.tmp_path(),
                        io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes"),
                    ))
                }
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SplitError::io(self.file.tmp_path(), e)),
            }
        }
        Ok(())
    }

    /// Checks that every byte arrived, fsyncs the file, renames it to its final name and fsyncs
    /// the directory. Only then does a file with the final name exist.
    pub fn finish(mut self) -> Result<WrittenFile> {
        if self.data_written != self.layout.data_len {
            return Err(SplitError::WriterMisuse {
                file: self.final_path.clone(),
                reason: format!(
                    "only {} of {} bytes of tensor data were written",
                    self.data_written, self.layout.data_len
                ),
            });
        }
        self.flush_buf()?;
        let size = self.layout.file_size();
        let tmp = self.file.tmp_path();
        let on_disk = self
            .file
            .file()
            .metadata()
            .map_err(|e| SplitError::io(tmp, e))?
            .len();
        if on_disk != size {
            return Err(SplitError::Io {
                path: tmp.to_path_buf(),
                source: io::Error::other(format!("file is {on_disk} bytes, expected {size}")),
            });
        }
        // Durable first (commit fsyncs), then out of the page cache.
        self.file
            .file()
            .sync_all()
            .map_err(|e| SplitError::io(tmp, e))?;
        fsutil::drop_cache(self.file.file());
        self.file.commit()?;
        Ok(WrittenFile {
            path: self.final_path,
            size,
            checksum: format_checksum(self.hasher.digest()),
        })
    }
}

/// Size and checksum (same format as [`WrittenFile::checksum`]) of an existing file, read
/// sequentially through `buf` (grown to at most 8 MiB and reused).
pub fn file_checksum(path: &Path, buf: &mut Vec<u8>) -> Result<(u64, String)> {
    let f = fsutil::open_regular(path)?;
    checksum_file(&f, path, buf, false)
}

/// [`file_checksum`] of an open file, from its first byte whatever its position; with
/// `keep_cache` its pages stay in the page cache (it is about to be read again).
pub(crate) fn checksum_file(
    f: &File,
    path: &Path,
    buf: &mut Vec<u8>,
    keep_cache: bool,
) -> Result<(u64, String)> {
    fsutil::advise_sequential(f);
    if buf.len() < CHECKSUM_BUF {
        buf.resize(CHECKSUM_BUF, 0);
    }
    let mut h = Box::new(Xxh3::new());
    let mut total = 0u64;
    loop {
        match f.read_at(&mut buf[..CHECKSUM_BUF], total) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SplitError::io(path, e)),
        }
    }
    if !keep_cache {
        fsutil::drop_cache(f);
    }
    Ok((total, format_checksum(h.digest())))
}

const CHECKSUM_BUF: usize = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn th(name: &str, dtype: Dtype, shape: &[usize]) -> TensorHeader {
        TensorHeader {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn header_is_padded_to_alignment_and_parses() {
        let tensors = vec![th("a", Dtype::F32, &[3, 5]), th("b", Dtype::BF16, &[7])];
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "x".to_string());
        for align in [8u64, 64, 4096] {
            let l = build_header(Path::new("f"), &tensors, &md, align).unwrap();
            assert_eq!(l.data_offset % align, 0);
            assert_eq!(l.bytes.len() as u64, l.data_offset);
            assert_eq!(l.offsets, vec![(0, 60), (60, 74)]);
            assert_eq!(l.data_len, 74);
            let mut file = l.bytes.clone();
            file.extend(std::iter::repeat_n(0u8, 74));
            let st = safetensors::SafeTensors::deserialize(&file).unwrap();
            assert_eq!(st.tensor("a").unwrap().shape(), &[3, 5]);
            assert_eq!(st.tensor("b").unwrap().dtype(), safetensors::Dtype::BF16);
        }
    }

    #[test]
    fn rejects_bad_alignment_duplicates_and_partial_bytes() {
        let md = BTreeMap::new();
        let t = vec![th("a", Dtype::F32, &[1])];
        for bad in [0u64, 3, 4, 12, 1 << 31] {
            assert!(build_header(Path::new("f"), &t, &md, bad).is_err(), "{bad}");
        }
        let dup = vec![th("a", Dtype::F32, &[1]), th("a", Dtype::F32, &[1])];
        let e = build_header(Path::new("f"), &dup, &md, 8).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let f4 = vec![th("q", Dtype::F4, &[3])];
        let e = build_header(Path::new("f"), &f4, &md, 8).unwrap_err();
        assert!(e.to_string().contains("tensor q"), "{e}");
    }

    #[test]
    fn writes_checksums_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let tensors = vec![th("a", Dtype::U8, &[10]), th("b", Dtype::U8, &[3])];
        let mut w = AlignedWriter::create(&path, tensors.clone(), BTreeMap::new(), 4096).unwrap();
        assert!(w.tmp_path().exists());
        w.write_data(&[1, 2, 3, 4]).unwrap();
        w.write_data(&[5, 6, 7, 8, 9, 10, 11]).unwrap();
        assert!(
            w.write_data(&[0, 0, 0]).is_err(),
            "more bytes than declared"
        );
        w.write_data(&[12, 13]).unwrap();
        let out = w.finish().unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(out.size, bytes.len() as u64);
        assert_eq!(bytes.len(), 4096 + 13);
        assert_eq!(&bytes[4096..], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(
            out.checksum,
            format_checksum(xxhash_rust::xxh3::xxh3_64(&bytes))
        );
        assert_eq!(
            file_checksum(&path, &mut Vec::new()).unwrap(),
            (out.size, out.checksum.clone())
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temporary left"
        );

        // Unfinished: dropping removes the tmp, and a short write cannot finish.
        let path2 = dir.path().join("y.safetensors");
        let mut w = AlignedWriter::create(&path2, tensors, BTreeMap::new(), 8).unwrap();
        w.write_data(&[1]).unwrap();
        let tmp = w.tmp_path().to_path_buf();
        let e = w.finish().unwrap_err();
        assert!(matches!(e, SplitError::WriterMisuse { .. }), "{e}");
        assert!(!tmp.exists() && !path2.exists());
    }

    #[test]
    fn injected_disk_full_names_the_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.safetensors");
        crate::testing::fail_writes_after(Some(4096 + 100));
        let mut tmp = PathBuf::new();
        let res = (|| {
            let mut w = AlignedWriter::create(
                &path,
                vec![th("a", Dtype::U8, &[3 << 20])],
                BTreeMap::new(),
                4096,
            )?;
            tmp = w.tmp_path().to_path_buf();
            w.write_data(&vec![7u8; 3 << 20])?;
            w.finish()
        })();
        crate::testing::fail_writes_after(None);
        let e = res.unwrap_err();
        assert!(matches!(e, SplitError::DiskFull { .. }), "{e:?}");
        assert!(e.to_string().contains("z.safetensors"), "{e}");
        assert!(!path.exists() && !tmp.exists());
    }
}
