//! `manifest.json` of a split directory: everything the executor needs to fetch a unit with one
//! sequential read (file, data region) and to view its tensors in place (names, dtypes, shapes,
//! offsets), plus what reuse checks need (source fingerprint, options, layout digest).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::error::{Result, SplitError};
use crate::layout::UnitKind;
use crate::quant::{Compression, QUANT_BLOCK};

/// Value of [`Manifest::format`].
pub const FORMAT_NAME: &str = "rabbit-split";
/// Version of the split format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a split directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the plan written before any unit (see docs/FORMAT.md).
pub const PLAN_FILE: &str = "split.plan.json";

/// The options a split was produced with; a split made with other options is not reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSettings {
    /// Data-region alignment of every unit file, in bytes.
    pub alignment: u64,
    /// Weight compression scheme (`None`: raw copy). Written as `"4bit"` / `"8bit"` / `null`.
    #[serde(with = "crate::quant::label_serde")]
    pub compression: Option<Compression>,
    /// Elements per quantization block ([`QUANT_BLOCK`]) when `compression` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// The embedding and LM head matrices are compressed too (only with `compression`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compress_embeddings: bool,
}

impl SplitSettings {
    /// Uncompressed settings with the given alignment.
    pub fn uncompressed(alignment: u64) -> SplitSettings {
        SplitSettings {
            alignment,
            compression: None,
            block_size: None,
            compress_embeddings: false,
        }
    }
}

/// The manifest of a complete split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for splits this crate reads.
    pub format_version: u32,
    /// `architectures[0]` of the source config.
    pub architecture: String,
    /// [`crate::checkpoint::source_fingerprint`] of the source when it was split.
    pub source_fingerprint: String,
    /// Digest of the [`crate::layout::Layout`] used (see [`crate::layout::Layout::digest`]).
    pub layout_digest: String,
    /// Options the split was made with.
    pub options: SplitSettings,
    /// The LM head reuses the embedding unit; there is no `lm_head` unit.
    pub tied_lm_head: bool,
    /// The source weight files were deleted after the split was verified; the split is then the
    /// only copy of the weights and is reused without comparing fingerprints.
    pub original_deleted: bool,
    /// Units in execution order.
    pub units: Vec<UnitEntry>,
}

/// One unit file of the split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitEntry {
    /// Unit name (`embed`, `layer.000`, `norm`, `lm_head`).
    pub name: String,
    /// Role of the unit; flattened into the entry as `"kind": "layer", "index": 3`.
    #[serde(flatten)]
    pub kind: UnitKind,
    /// File name relative to the split directory (`<name>.safetensors`).
    pub file: String,
    /// File size in bytes.
    pub size: u64,
    /// `xxh3:` + 16 hex digits: XXH3-64 of the whole file.
    pub checksum: String,
    /// Absolute offset of the data region (a multiple of the alignment).
    pub data_offset: u64,
    /// Length of the data region; `data_offset + data_len == size`.
    pub data_len: u64,
    /// Tensors in file order.
    pub tensors: Vec<TensorEntry>,
    /// Source tensors stored compressed in this unit (each as a codes and a scales tensor of
    /// `tensors`); absent from the JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantized: Vec<QuantizedEntry>,
}

/// A source tensor stored block-quantized: `codes` and `scales` name entries of the unit's
/// `tensors`; the tensor `name` itself is not in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizedEntry {
    /// Checkpoint name of the original tensor (`W`).
    pub name: String,
    /// Quantization scheme (`"nf4"` or `"int8"`).
    pub scheme: Compression,
    /// Elements per block ([`QUANT_BLOCK`]).
    pub block_size: usize,
    /// Shape of the original tensor.
    pub shape: Vec<usize>,
    /// Dtype of the original tensor (what dequantized values should be cast back to).
    pub dtype: Dtype,
    /// Name of the codes tensor (`W.q`: `U8` packed NF4 pairs, or `I8`).
    pub codes: String,
    /// Name of the `F32` per-block scales tensor (`W.scale`).
    pub scales: String,
}

/// One tensor inside a unit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Full checkpoint tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Offset relative to the unit's `data_offset` (naturally aligned for `dtype`).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl UnitEntry {
    /// Looks up a tensor of this unit by full name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Looks up a quantized tensor of this unit by its original full name.
    pub fn quantized_tensor(&self, name: &str) -> Option<&QuantizedEntry> {
        self.quantized.iter().find(|q| q.name == name)
    }
}

impl Manifest {
    /// Loads and sanity-checks `manifest.json` from a split directory.
    pub fn load(split_dir: &Path) -> Result<Manifest> {
        let path = split_dir.join(MANIFEST_FILE);
        let Some(bytes) = crate::fsutil::read_regular(&path)? else {
            return Err(SplitError::MissingManifest {
                dir: split_dir.to_path_buf(),
            });
        };
        Self::parse(&path, &bytes)
    }

    /// Parses manifest bytes (`path` is for messages) and checks internal consistency.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let bad = |reason: String| SplitError::BadManifest {
            file: path.to_path_buf(),
            reason,
        };
        // Check format and version first, so a newer format gets a clear message rather than a
        // field-level parse error.
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            format_version: Option<u32>,
        }
        let head: Head =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if head.format.as_deref() != Some(FORMAT_NAME) {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                head.format
            )));
        }
        if head.format_version != Some(FORMAT_VERSION) {
            return Err(bad(format!(
                "format_version is {:?}; this build reads version {FORMAT_VERSION} (re-split the model)",
                head.format_version
            )));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        m.check().map_err(bad)?;
        Ok(m)
    }

    fn check(&self) -> std::result::Result<(), String> {
        crate::writer::check_alignment(self.options.alignment).map_err(|e| e.to_string())?;
        let mut layers = 0usize;
        for u in &self.units {
            if u.file.is_empty() || u.file.contains('/') || u.file.starts_with('.') {
                return Err(format!(
                    "unit {} has an invalid file name {:?}",
                    u.name, u.file
                ));
            }
            if u.data_offset.checked_add(u.data_len) != Some(u.size) {
                return Err(format!("unit {}: data_offset + data_len != size", u.name));
            }
            for t in &u.tensors {
                if t.offset.checked_add(t.len).is_none_or(|e| e > u.data_len) {
                    return Err(format!(
                        "tensor {} of unit {} lies outside the data region",
                        t.name, u.name
                    ));
                }
            }
            for q in &u.quantized {
                check_quantized(u, q)?;
            }
            if let UnitKind::Layer(i) = u.kind {
                if i != layers {
                    return Err(format!(
                        "unit {} is layer {i}, expected layer {layers}",
                        u.name
                    ));
                }
                layers += 1;
            }
        }
        Ok(())
    }

    /// The compression of this split (`options.compression`).
    pub fn compression(&self) -> Option<Compression> {
        self.options.compression
    }

    /// The unit of a given kind (`UnitKind::LmHead` is `None` for tied models).
    pub fn unit(&self, kind: UnitKind) -> Option<&UnitEntry> {
        self.units.iter().find(|u| u.kind == kind)
    }

    /// Decoder layer units in order.
    pub fn layers(&self) -> impl Iterator<Item = &UnitEntry> {
        self.units
            .iter()
            .filter(|u| matches!(u.kind, UnitKind::Layer(_)))
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers().count()
    }

    /// Absolute path of a unit's file.
    pub fn unit_path(&self, split_dir: &Path, unit: &UnitEntry) -> PathBuf {
        split_dir.join(&unit.file)
    }

    /// Serializes the manifest as written to disk (pretty JSON, trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }
}

/// A quantized entry must name a codes and a scales tensor of the unit with the dtypes and
/// lengths its scheme, block size and shape imply.
fn check_quantized(u: &UnitEntry, q: &QuantizedEntry) -> std::result::Result<(), String> {
    let bad = |what: &str| {
        Err(format!(
            "quantized tensor {} of unit {}: {what}",
            q.name, u.name
        ))
    };
    if q.block_size != QUANT_BLOCK {
        return bad(&format!(
            "block size {} (this build reads {QUANT_BLOCK})",
            q.block_size
        ));
    }
    let Some(numel) = crate::dtype::numel(&q.shape).and_then(|n| usize::try_from(n).ok()) else {
        return bad("shape overflows");
    };
    let want_codes = vec![q.scheme.codes_len(numel)];
    let want_scales = vec![Compression::num_blocks(numel)];
    match u.tensor(&q.codes) {
        Some(t) if t.dtype == q.scheme.codes_dtype() && t.shape == want_codes => {}
        Some(_) => {
            return bad(&format!(
                "codes tensor {} has the wrong dtype or shape",
                q.codes
            ))
        }
        None => return bad(&format!("codes tensor {} is missing", q.codes)),
    }
    match u.tensor(&q.scales) {
        Some(t) if t.dtype == Dtype::F32 && t.shape == want_scales => {}
        Some(_) => {
            return bad(&format!(
                "scales tensor {} has the wrong dtype or shape",
                q.scales
            ))
        }
        None => return bad(&format!("scales tensor {} is missing", q.scales)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            architecture: "X".into(),
            source_fingerprint: "xxh3:0".into(),
            layout_digest: "xxh3:1".into(),
            options: SplitSettings::uncompressed(4096),
            tied_lm_head: true,
            original_deleted: false,
            units: vec![
                UnitEntry {
                    name: "embed".into(),
                    kind: UnitKind::Embedding,
                    file: "embed.safetensors".into(),
                    size: 4100,
                    checksum: "xxh3:2".into(),
                    data_offset: 4096,
                    data_len: 4,
                    tensors: vec![TensorEntry {
                        name: "e".into(),
                        dtype: Dtype::BF16,
                        shape: vec![2],
                        offset: 0,
                        len: 4,
                    }],
                    quantized: vec![],
                },
                UnitEntry {
                    name: "layer.000".into(),
                    kind: UnitKind::Layer(0),
                    file: "layer.000.safetensors".into(),
                    size: 4096,
                    checksum: "xxh3:3".into(),
                    data_offset: 4096,
                    data_len: 0,
                    tensors: vec![],
                    quantized: vec![],
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_queries() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"dtype\": \"BF16\""), "{text}");
        assert!(
            text.contains("\"kind\": \"layer\",\n      \"index\": 0,"),
            "{text}"
        );
        assert!(
            text.contains("\"kind\": \"embedding\",\n      \"file\""),
            "{text}"
        );
        let back = Manifest::parse(Path::new("m"), &json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.num_layers(), 1);
        assert_eq!(back.unit(UnitKind::Embedding).unwrap().name, "embed");
        assert!(back.unit(UnitKind::LmHead).is_none());
        assert_eq!(back.layers().next().unwrap().kind, UnitKind::Layer(0));
    }

    #[test]
    fn settings_serialize_as_labels_and_old_manifests_parse() {
        let m = sample();
        let text = String::from_utf8(m.to_json()).unwrap();
        // Uncompressed settings are written exactly as before compression existed.
        assert!(
            text.contains(
                "\"options\": {\n    \"alignment\": 4096,\n    \"compression\": null\n  },"
            ),
            "{text}"
        );
        assert!(!text.contains("quantized"), "{text}");
        let mut q = sample();
        q.options = SplitSettings {
            alignment: 4096,
            compression: Some(Compression::Nf4),
            block_size: Some(QUANT_BLOCK),
            compress_embeddings: true,
        };
        let text = String::from_utf8(q.to_json()).unwrap();
        assert!(text.contains("\"compression\": \"4bit\""), "{text}");
        assert!(text.contains("\"block_size\": 64"), "{text}");
        assert!(text.contains("\"compress_embeddings\": true"), "{text}");
        assert_eq!(Manifest::parse(Path::new("m"), text.as_bytes()).unwrap(), q);
        // "nf4" / "int8" are accepted on input; unknown labels are not.
        let alt = text.replace("\"4bit\"", "\"nf4\"");
        assert_eq!(Manifest::parse(Path::new("m"), alt.as_bytes()).unwrap(), q);
        let bad = text.replace("\"4bit\"", "\"2bit\"");
        let e = Manifest::parse(Path::new("m"), bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("2bit"), "{e}");
    }

    #[test]
    fn rejects_other_versions_and_inconsistencies() {
        let mut m = sample();
        m.format_version = 2;
        let e = Manifest::parse(Path::new("m.json"), &m.to_json()).unwrap_err();
        assert!(e.to_string().contains("format_version"), "{e}");
        let mut m = sample();
        m.units[0].size = 1;
        assert!(Manifest::parse(Path::new("m.json"), &m.to_json()).is_err());
        let mut m = sample();
        m.units[0].file = "../escape".into();
        assert!(Manifest::parse(Path::new("m.json"), &m.to_json()).is_err());
        let mut m = sample();
        m.units[1].kind = UnitKind::Layer(3);
        assert!(Manifest::parse(Path::new("m.json"), &m.to_json()).is_err());
        let e = Manifest::parse(Path::new("m.json"), b"{nope").unwrap_err();
        assert!(matches!(e, SplitError::BadManifest { .. }) && e.to_string().contains("m.json"));
    }
}
