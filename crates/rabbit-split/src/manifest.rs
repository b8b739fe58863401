//! `manifest.json` of a split directory: everything the executor needs to fetch a unit with one
//! sequential read (file, data region) and to view its tensors in place (names, dtypes, shapes,
//! offsets), plus what reuse checks need (source fingerprint, options, layout digest).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::error::{Result, SplitError};
use crate::layout::UnitKind;

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
    /// Weight compression / quantization scheme; always `None` (raw copy) in format version 1.
    pub compression: Option<String>,
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
}

impl Manifest {
    /// Loads and sanity-checks `manifest.json` from a split directory.
    pub fn load(split_dir: &Path) -> Result<Manifest> {
        let path = split_dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SplitError::MissingManifest {
                    dir: split_dir.to_path_buf(),
                })
            }
            Err(e) => return Err(SplitError::io(&path, e)),
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
            options: SplitSettings {
                alignment: 4096,
                compression: None,
            },
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
