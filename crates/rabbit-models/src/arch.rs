//! The [`Architecture`] trait and the [`Variant`] settings a family gives the shared config
//! resolution (`resolve.rs`). A family file (`qwen2.rs`, `gemma.rs`, ...) says what its model
//! is: its variant, the keys only it has, its tensor inventory and the blocks it is built from.

use serde_json::Value;

use crate::blocks::Activation;
use crate::config::{GenerationConfig, HfConfig};
use crate::error::{ModelError, Result};
use crate::spec::ModelSpec;

/// How sliding-window attention is switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingPolicy {
    /// Never used; a config asking for it is refused.
    Unsupported,
    /// Qwen2/Qwen3: only when `use_sliding_window` is true, and only for layers
    /// `>= max_window_layers` (or as `layer_types` says).
    QwenStyle,
    /// Mistral, Phi-3: whenever `sliding_window` is set, on every layer.
    AllLayers,
    /// Gemma: `sliding_window` applies to every layer but each `period`-th (`layer_types` when
    /// config.json has them; the family may set the period from its own key).
    Pattern {
        /// Every `period`-th layer (1-based) is full attention.
        period: usize,
        /// The window when config.json gives none (transformers' config default).
        default_window: usize,
    },
}

/// What one family changes in the shared config resolution.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// `architectures[0]`.
    pub name: &'static str,
    /// config.json `model_type`.
    pub model_type: &'static str,
    /// head_dim when config.json has none (None: hidden_size / num_attention_heads).
    pub default_head_dim: Option<usize>,
    /// `rope_theta` when config.json has none.
    pub default_rope_theta: f64,
    /// `rms_norm_eps` when config.json has none.
    pub default_rms_norm_eps: f64,
    /// Sliding-window semantics.
    pub sliding: SlidingPolicy,
    /// `max_window_layers` default (Qwen-style only).
    pub default_max_window_layers: usize,
    /// `partial_rotary_factor` when config.json has none; `None`: the family rotates whole
    /// heads and a factor below 1 is refused.
    pub partial_rotary: Option<f64>,
    /// `tie_word_embeddings` when config.json has none.
    pub tied_by_default: bool,
    /// The config key naming the MLP activation (`hidden_act`; Gemma: `hidden_activation`,
    /// its `hidden_act` being unused), and the activation when it is absent.
    pub activation: (&'static str, Activation),
    /// config.json keys this family carries that cannot change the numerics of inference.
    pub harmless_keys: &'static [&'static str],
}

/// A registered model family. Implementations are unit structs in one file per lineage.
pub trait Architecture: Send + Sync + 'static {
    /// The family's config resolution settings.
    fn variant(&self) -> &'static Variant;

    /// `architectures[0]` of its checkpoints.
    fn name(&self) -> &'static str {
        self.variant().name
    }

    /// Other `architectures[0]` values its checkpoints carry (ChatGLM writes either of two).
    fn other_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// Short key (`gemma2`, ...) for `rabbit synth --arch`.
    fn key(&self) -> &'static str;

    /// Resolves config.json (+ generation_config.json) into a spec, refusing anything that
    /// would silently produce wrong numbers.
    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec>;

    /// [`Architecture::spec`] for the checkpoint in `dir`: a family whose config leaves
    /// something open that the checkpoint's own files settle reads them (Baichuan's two
    /// position schemes ship as two `modeling_baichuan.py` files). By default the config alone.
    fn spec_in_dir(
        &self,
        cfg: &HfConfig,
        gen: Option<&GenerationConfig>,
        dir: &std::path::Path,
    ) -> Result<ModelSpec> {
        let _ = dir;
        self.spec(cfg, gen)
    }

    /// The family-specific part of a synthetic config.json for this shape (what the family's
    /// real checkpoints carry beyond the common keys).
    /// `None` when the family is not synthesised (another family writes the same model).
    fn synth_config(&self, shape: &SynthShape) -> Option<serde_json::Map<String, Value>>;

    /// The family's own spellings of common config keys, `(its key, common key)`: renamed before
    /// config.json is parsed (ChatGLM writes `num_layers` for `num_hidden_layers`). A config
    /// giving both spellings with different values is refused.
    fn config_aliases(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// Turns a synthetic config.json written with the common keys into the family's own
    /// spelling (what its real checkpoints carry). By default the aliases renamed back.
    fn synth_finish(&self, cfg: &mut serde_json::Map<String, Value>) {
        unalias(cfg, self.config_aliases());
    }

    /// For a wrapper whose config.json nests the language model in `text_config`: the defaults
    /// of that text config's class in transformers (hub configs leave most keys out).
    fn text_config_defaults(&self) -> Option<Value> {
        None
    }

    /// Whether `rabbit synth --arch {key}` writes this family.
    fn can_synth(&self) -> bool {
        let shape = SynthShape {
            layers: 1,
            hidden: 64,
            heads: 4,
            head_dim: 16,
        };
        self.synth_config(&shape).is_some()
    }
}

/// Renames the common keys of `aliases` (`(family key, common key)`) back to the family's.
pub fn unalias(cfg: &mut serde_json::Map<String, Value>, aliases: &[(&str, &str)]) {
    for (family, common) in aliases {
        if let Some(v) = cfg.remove(*common) {
            cfg.insert(family.to_string(), v);
        }
    }
}

/// The shape of a synthetic checkpoint, as far as a family's config keys depend on it.
#[derive(Debug, Clone, Copy)]
pub struct SynthShape {
    /// Decoder layers.
    pub layers: usize,
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// The error for a config a family cannot run, naming the field.
pub fn unsupported(v: &Variant, reason: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        architecture: v.name.to_string(),
        reason: reason.into(),
    }
}
