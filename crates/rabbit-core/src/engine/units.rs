//! Where a unit's bytes come from when the engine opens ([`Units`]: a split's files or the
//! original shards), and what is read resident from them: whole units, chosen tensors, mapped
//! head matrices, the guide routers of `--expert-guess`.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rabbit_models::ModelSpec;
use rabbit_split::layout::RowOrder;
use rabbit_split::manifest::{Manifest, UnitEntry};
use rabbit_split::{FileStamp, UnitRegion};
use tch::{Device, Kind, Tensor};

use super::experts::Guide;
use crate::decoder::NormWeights;
use crate::error::{CoreError, Result};
use crate::head::MappedMatrix;
use crate::weights::{kind_of, reorder_rows, UnitTensors};

/// Where the units' bytes come from.
pub(super) struct Units<'a> {
    pub(super) manifest: &'a Manifest,
    pub(super) regions: &'a [UnitRegion],
    pub(super) row_orders: &'a [RowOrder],
    /// Block size of FP8 weights' scales.
    pub(super) fp8_block: Option<[usize; 2]>,
    /// Original shards streamed in place (changes how damage is reported).
    pub(super) original: bool,
    /// In place: the files' identities when their headers were read.
    pub(super) stamps: &'a [FileStamp],
}

impl Units<'_> {
    pub(super) fn region(&self, entry: &UnitEntry) -> &UnitRegion {
        let i = self
            .manifest
            .units
            .iter()
            .position(|u| std::ptr::eq(u, entry))
            .expect("entries come from this manifest");
        &self.regions[i]
    }

    /// Loads a unit that stays resident, tensor by tensor straight into tensor storage (no
    /// whole-unit staging buffer, so loading a 2 GB embedding needs 2 GB, not 4).
    pub(super) fn read_resident(
        &self,
        entry: &UnitEntry,
        device: Device,
        kind: Kind,
    ) -> Result<UnitTensors> {
        self.read_resident_only(entry, device, kind, |_| true)
    }

    /// [`Units::read_resident`] of the tensors `want` accepts (a mapped LM head's bias without
    /// its weight).
    pub(super) fn read_resident_only(
        &self,
        entry: &UnitEntry,
        device: Device,
        kind: Kind,
        want: impl Fn(&str) -> bool,
    ) -> Result<UnitTensors> {
        let region = self.region(entry);
        // A compressed tensor is wanted by its original name, or by both its codes and scales.
        let quantized: Vec<_> = entry
            .quantized
            .iter()
            .filter(|q| want(&q.name) || (want(&q.codes) && want(&q.scales)))
            .cloned()
            .collect();
        let want = |n: &str| {
            want(n)
                || quantized
                    .iter()
                    .any(|q| want(&q.name) && (q.codes == n || q.scales == n))
        };
        let mut files: HashMap<&Path, std::fs::File> = HashMap::new();
        let mut tensors = std::collections::BTreeMap::new();
        for t in entry.tensors.iter().filter(|t| want(&t.name)) {
            let (extent, at) =
                region
                    .locate(t.offset, t.len)
                    .ok_or_else(|| CoreError::BadTensor {
                        file: entry.file.clone().into(),
                        tensor: t.name.clone(),
                        reason: "its bytes lie outside the unit's data".into(),
                    })?;
            let path = extent.file.as_path();
            let stored = kind_of(t.dtype).ok_or_else(|| CoreError::BadTensor {
                file: path.to_path_buf(),
                tensor: t.name.clone(),
                reason: format!("dtype {} cannot hold weights", t.dtype.name()),
            })?;
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let host = Tensor::f_empty(shape.as_slice(), (stored, Device::Cpu))?;
            let numel: i64 = shape.iter().product();
            if (numel as u64) * (t.dtype.size_bytes() as u64) != t.len {
                return Err(CoreError::BadTensor {
                    file: path.to_path_buf(),
                    tensor: t.name.clone(),
                    reason: format!("{} bytes for shape {:?}", t.len, t.shape),
                });
            }
            let file = match files.entry(path) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(rabbit_split::fsutil::open_regular(path)?)
                }
            };
            // SAFETY: `host` is a fresh contiguous CPU tensor of exactly `t.len` bytes.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, t.len as usize)
            };
            file.read_exact_at(dst, at).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    CoreError::truncated_file(path, self.original)
                } else {
                    CoreError::io(path, e)
                }
            })?;
            let host = match RowOrder::of(self.row_orders, &t.name) {
                Some(o) => reorder_rows(&host, o)?,
                None => host,
            };
            tensors.insert(t.name.clone(), host.f_to_device(device)?);
        }
        let entry = UnitEntry {
            quantized,
            ..entry.clone()
        };
        UnitTensors::assemble(&entry, tensors, kind, self.fp8_block)
    }

    pub(super) fn mapped(&self, entry: &UnitEntry, name: &str) -> Result<Arc<MappedMatrix>> {
        if RowOrder::of(self.row_orders, name).is_some() {
            return Err(CoreError::InvalidInput(format!(
                "`{name}` is stored with its rows regrouped and cannot be used in place"
            )));
        }
        MappedMatrix::open_in(self.region(entry), entry, name, self.original)
    }
}

/// Layer `i`'s router and the norm before it, read resident (see [`Guide`]).
pub(super) fn read_guide(
    units: &Units<'_>,
    spec: &ModelSpec,
    i: usize,
    entry: &UnitEntry,
    device: Device,
    kind: Kind,
) -> Result<Guide> {
    let p = spec.tensors.prefix(i);
    let find = |role: rabbit_models::Role| {
        spec.layer_params(i)
            .iter()
            .find(|q| q.role == role)
            .map(|q| q.weight_name(&p))
    };
    let name = |role: rabbit_models::Role| {
        find(role).ok_or_else(|| CoreError::InvalidInput(format!("layer {i} has no {role:?}")))
    };
    let (router, norm) = (
        name(rabbit_models::Role::Router)?,
        name(rabbit_models::Role::MlpNorm)?,
    );
    let bias = find(rabbit_models::Role::RouterBias);
    // gpt-oss's router carries a `.bias` of its own.
    let router_bias = spec
        .layer_params(i)
        .iter()
        .find(|q| q.role == rabbit_models::Role::Router && q.bias)
        .map(|q| format!("{p}{}.bias", q.name));
    // A router stored compressed (splits made before routers were kept exact) is read with
    // its codes and scales, and dequantized.
    let mut u = units.read_resident_only(entry, device, kind, |n| {
        n == norm
            || n == router
            || bias.as_deref() == Some(n)
            || router_bias.as_deref() == Some(n)
            || n.strip_suffix("_scale_inv") == Some(router.as_str())
    })?;
    Ok(Guide {
        norm: NormWeights::bind(spec.norm.kind, u.take(&norm)?, None)?,
        router: crate::weights::Linear {
            weight: crate::weights::LinearWeight::Dense(u.take(&router)?),
            bias: router_bias.map(|b| u.take(&b)).transpose()?,
        },
        bias: bias.map(|b| u.take(&b)).transpose()?,
    })
}
