//! Which checkpoint tensors go into which layer unit. Built by the architecture (rabbit-models),
//! so the splitter carries no knowledge of any model family's tensor names.

use serde::{Deserialize, Serialize};

/// The role of one unit of the split model, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "index")]
pub enum UnitKind {
    /// Token embedding table.
    Embedding,
    /// Decoder layer `i` (0-based).
    Layer(usize),
    /// Final norm before the LM head.
    FinalNorm,
    /// Output projection (absent from the split when tied to the embedding).
    LmHead,
}

/// One output file of the split: a unit name (also its file stem) and the exact checkpoint tensor
/// names it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSpec {
    /// File stem, e.g. `embed`, `layer.007`, `norm`, `lm_head`.
    pub name: String,
    /// Role of the unit.
    pub kind: UnitKind,
    /// Tensors that must exist in the checkpoint (full HF names).
    pub required: Vec<String>,
    /// Tensors taken when present (e.g. biases some checkpoints carry).
    pub optional: Vec<String>,
}

/// The complete tensor-to-unit map for one checkpoint, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// `architectures[0]` of config.json, recorded in the manifest.
    pub architecture: String,
    /// Units in execution order: embedding, layers, final norm, lm_head (if untied).
    pub units: Vec<UnitSpec>,
    /// The LM head reuses the embedding's bytes; a checkpoint's `lm_head.weight`, if any, is
    /// ignored when this is set.
    pub tied_lm_head: bool,
    /// Checkpoint tensors that are expected but deliberately not split (exact names or names
    /// ending with one of these suffixes, e.g. `rotary_emb.inv_freq`, or the redundant
    /// `lm_head.weight` of a tied model). Any other tensor no unit claims is an error.
    pub ignored_suffixes: Vec<String>,
    /// Checkpoint tensors under these prefixes are deliberately not split (e.g. the vision tower
    /// of a multimodal checkpoint whose language model is run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_prefixes: Vec<String>,
    /// `(checkpoint prefix, layout prefix)` pairs: a layout tensor `{layout prefix}rest` absent
    /// from the checkpoint is read from `{checkpoint prefix}rest` (and stored under the layout's
    /// name), for checkpoints that nest the same model under another prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<(String, String)>,
    /// Tensors stored with their rows regrouped (see [`RowOrder`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub row_orders: Vec<RowOrder>,
    /// The shape config.json implies for each tensor it names: a checkpoint tensor of another
    /// shape is refused before anything is written (a split that could never load, or worse,
    /// one whose originals `--delete-original` would remove). Not part of the digest: it only
    /// restates what the units' names and the config already fix.
    #[serde(skip)]
    pub shapes: std::collections::BTreeMap<String, Vec<usize>>,
    /// Tensors a unit file stores together, as groups numbered in file order (absent: group
    /// 0): each routed expert of a mixture of experts is a group, so one read fetches one
    /// expert, codes and scales included.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub groups: std::collections::BTreeMap<String, u32>,
    /// Tensors stored as they are even under compression (a router, whose choice a small
    /// error would flip).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uncompressed: Vec<String>,
    /// Checkpoint tensors that stack one tensor per routed expert (see [`Stacked`]): the units
    /// name their parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacked: Vec<Stacked>,
}

/// A checkpoint tensor stacking one tensor per routed expert along its first dimension
/// (gpt-oss's `mlp.experts.gate_up_proj`, `[experts, hidden, 2 * intermediate]`): read as the
/// separate tensors `parts[e]`, each one contiguous range of it, so one read fetches one expert
/// in a split and in place alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stacked {
    /// Full checkpoint name of the stacked tensor.
    pub tensor: String,
    /// The part names, one per row of its first dimension.
    pub parts: Vec<String>,
}

/// A tensor whose rows the split stores in another order than the checkpoint: the leading
/// dimension is cut into `order.len()` blocks of equal size, and block `i` of the split is block
/// `order[i]` of the checkpoint. For a packing the executor does not read (InternLM2's `wqkv`,
/// packed per KV group, is stored as plain `[q; k; v]`), done once at split time rather than on
/// every load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowOrder {
    /// Full checkpoint name (as the layout names it).
    pub tensor: String,
    /// Source block of each output block; a permutation of `0..order.len()`.
    pub order: Vec<usize>,
}

impl RowOrder {
    /// Checks that `order` is a permutation.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut seen = vec![false; self.order.len()];
        for &b in &self.order {
            match seen.get_mut(b) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(format!(
                        "the row order of {} is not a permutation of 0..{}",
                        self.tensor,
                        self.order.len()
                    ))
                }
            }
        }
        if self.order.is_empty() {
            return Err(format!("the row order of {} is empty", self.tensor));
        }
        Ok(())
    }

    /// The row order of `tensor`, if the layout regroups it.
    pub fn of<'a>(orders: &'a [RowOrder], tensor: &str) -> Option<&'a RowOrder> {
        orders.iter().find(|o| o.tensor == tensor)
    }
}

impl Layout {
    /// `xxh3:` digest of the whole layout (architecture, units, tensor names, tie flag, ignored
    /// suffixes). Stored in the plan and manifest: a split made with a different layout is stale.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("layout serializes");
        crate::writer::format_checksum(xxhash_rust::xxh3::xxh3_64(&json))
    }

    /// True when a tensor nobody claims is expected and should be skipped silently.
    pub fn is_ignored(&self, tensor: &str) -> bool {
        self.ignored_suffixes
            .iter()
            .any(|s| !s.is_empty() && tensor.ends_with(s.as_str()))
            || self
                .ignored_prefixes
                .iter()
                .any(|p| !p.is_empty() && tensor.starts_with(p.as_str()))
    }

    /// Looks a layout tensor up with `get`: under its own name, else under each alias.
    pub fn find<T>(&self, name: &str, get: impl Fn(&str) -> Option<T>) -> Option<T> {
        get(name).or_else(|| {
            self.aliases.iter().find_map(|(from, to)| {
                name.strip_prefix(to.as_str())
                    .and_then(|rest| get(&format!("{from}{rest}")))
            })
        })
    }

    /// Number of decoder layer units.
    pub fn num_layers(&self) -> usize {
        self.units
            .iter()
            .filter(|u| matches!(u.kind, UnitKind::Layer(_)))
            .count()
    }

    /// Checks the layout is usable: unit names are unique, safe file stems; layers are numbered
    /// 0..n in order; at most one embedding / final norm / LM head, none when tied; no tensor is
    /// claimed twice.
    pub fn validate(&self) -> crate::Result<()> {
        let err = |reason: String| crate::SplitError::InvalidLayout {
            architecture: self.architecture.clone(),
            reason,
        };
        let mut names = std::collections::HashSet::new();
        let mut owner: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        let mut next_layer = 0usize;
        let (mut embed, mut norm, mut head) = (0, 0, 0);
        for u in &self.units {
            let n = u.name.as_str();
            if n.is_empty()
                || n.starts_with('.')
                || n.len() > 200
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(err(format!(
                    "unit name {n:?} is not a safe file name ([A-Za-z0-9._-], not starting with '.')"
                )));
            }
            if !names.insert(n) {
                return Err(err(format!("unit name {n} is used twice")));
            }
            match u.kind {
                UnitKind::Embedding => embed += 1,
                UnitKind::FinalNorm => norm += 1,
                UnitKind::LmHead => head += 1,
                UnitKind::Layer(i) => {
                    if i != next_layer {
                        return Err(err(format!(
                            "unit {n} is layer {i}, expected layer {next_layer} (layers must be numbered 0..n in order)"
                        )));
                    }
                    next_layer += 1;
                }
            }
            for t in u.required.iter().chain(&u.optional) {
                if let Some(prev) = owner.insert(t.as_str(), n) {
                    return Err(err(format!(
                        "tensor {t} is claimed by units {prev} and {n}"
                    )));
                }
            }
        }
        if embed > 1 || norm > 1 || head > 1 {
            return Err(err(
                "more than one embedding, final norm or LM head unit".into()
            ));
        }
        for o in &self.row_orders {
            o.check().map_err(err)?;
            if !owner.contains_key(o.tensor.as_str()) {
                return Err(err(format!(
                    "the row order names {}, which no unit holds",
                    o.tensor
                )));
            }
        }
        if self.tied_lm_head && head > 0 {
            return Err(err(
                "tied_lm_head is set but the layout has an LM head unit".into(),
            ));
        }
        Ok(())
    }
}
