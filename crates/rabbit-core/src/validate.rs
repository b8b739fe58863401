//! The check a split (or a checkpoint streamed in place) passes before anything runs: every
//! tensor the spec names, of the shape it implies and a dtype the executor reads.

use std::collections::BTreeMap;
use std::path::Path;

use rabbit_models::ModelSpec;
use rabbit_split::dtype::Dtype;
use rabbit_split::manifest::{Manifest, UnitEntry};

use crate::error::{CoreError, Result};
use crate::weights::{is_float, kind_of};

/// Checks that a split holds exactly the tensors, shapes and float dtypes the spec expects, so a
/// mismatch is reported by name before any compute (never a shape error mid-generation).
pub fn validate_split(spec: &ModelSpec, manifest: &Manifest, dir: &Path) -> Result<()> {
    // name -> (unit, logical shape, logical dtype): quantized tensors count under their
    // original name and shape.
    let mut found: BTreeMap<&str, (&UnitEntry, &[usize], Dtype)> = BTreeMap::new();
    for u in &manifest.units {
        for t in &u.tensors {
            found.insert(t.name.as_str(), (u, &t.shape, t.dtype));
        }
        for q in &u.quantized {
            found.insert(q.name.as_str(), (u, &q.shape, q.dtype));
        }
    }
    if manifest.num_layers() != spec.num_layers {
        return Err(CoreError::InvalidInput(format!(
            "{}: split has {} layers but config.json says num_hidden_layers = {}",
            dir.display(),
            manifest.num_layers(),
            spec.num_layers
        )));
    }
    let mut expected = spec.tensor_shapes();
    // MXFP4 blocks and exponents are bytes.
    let packed: std::collections::HashSet<String> = (0..spec.num_layers)
        .flat_map(|i| {
            let p = spec.tensors.prefix(i);
            spec.layer_params(i)
                .iter()
                .filter(|q| q.role.is_packed())
                .map(move |q| q.weight_name(&p))
                .collect::<Vec<_>>()
        })
        .collect();
    if spec.tie_word_embeddings != manifest.tied_lm_head {
        return Err(CoreError::InvalidInput(format!(
            "{}: split tied_lm_head = {} but config.json tie_word_embeddings = {}",
            dir.display(),
            manifest.tied_lm_head,
            spec.tie_word_embeddings
        )));
    }
    for (name, shape) in expected.drain(..) {
        let Some(&(u, found_shape, dtype)) = found.get(name.as_str()) else {
            return Err(CoreError::BadTensor {
                file: dir.to_path_buf(),
                tensor: name,
                reason: "expected by config.json but absent from the split".into(),
            });
        };
        if found_shape != shape.as_slice() {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                tensor: name,
                reason: format!("shape {found_shape:?} but config.json implies {shape:?}"),
            });
        }
        let scaled = u.tensor(&format!("{name}_scale_inv")).is_some();
        if dtype == Dtype::F8_E4M3 && !scaled {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                reason: format!("an FP8 tensor without its scale `{name}_scale_inv`"),
                tensor: name,
            });
        }
        let bytes_ok = dtype == Dtype::U8 && packed.contains(name.as_str());
        if !(kind_of(dtype).is_some_and(is_float) || dtype == Dtype::F8_E4M3 || bytes_ok) {
            return Err(CoreError::BadTensor {
                file: dir.join(&u.file),
                tensor: name,
                reason: format!("dtype {} is not a float type", dtype.name()),
            });
        }
    }
    Ok(())
}
