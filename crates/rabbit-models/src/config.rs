//! Serde mirrors of the HF `config.json` and `generation_config.json` files.
//!
//! Both layouts found in the wild are accepted: the classic keys (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and those transformers 5 writes (`rope_parameters`, `dtype`). Resolution into
//! one unambiguous [`crate::ModelSpec`] happens in [`crate::arch`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One token id or a list of them (`eos_token_id` is either in the wild).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `bos_token_id`/`pad_token_id` as old checkpoints write them: `-1` (LLaMA-1 era) or a list
/// containing it means "none". Only ids that can exist are kept.
fn optional_ids<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<TokenIds>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Loose {
        One(i64),
        Many(Vec<i64>),
    }
    let keep = |i: i64| u32::try_from(i).ok();
    Ok(match Option::<Loose>::deserialize(d)? {
        None => None,
        Some(Loose::One(i)) => keep(i).map(TokenIds::One),
        Some(Loose::Many(v)) => {
            let ids: Vec<u32> = v.into_iter().filter_map(keep).collect();
            (!ids.is_empty()).then_some(TokenIds::Many(ids))
        }
    })
}

/// The fields of `config.json` that decoder-only families of the Llama lineage use.
///
/// Every other key lands in `extra`; [`crate::arch`] decides whether it is harmless or must be
/// refused (a key that would change the numerics, e.g. `quantization_config`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    /// e.g. `["Qwen2ForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// e.g. `qwen2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Rows of the embedding and LM head (may exceed the tokenizer's vocabulary).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; when absent the family's default applies (Qwen3: 128, others:
    /// hidden/heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// MLP activation; only `silu` is supported by these families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Longest context the model was configured for (Baichuan 13B has none: its family takes
    /// `model_max_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// Classic layout: RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Classic layout: RoPE scaling dictionary (`type`/`rope_type`, `factor`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5 layout: `{"rope_type": ..., "rope_theta": ..., ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// Partial rotary embeddings (not supported by these families unless 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Whether lm_head reuses the embedding matrix; the family decides the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Classic layout: storage dtype (`bfloat16`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// transformers 5 layout: storage dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Sliding-window attention width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: the window applies only when this is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3: layers below this index use full attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Explicit per-layer attention kinds (`full_attention` / `sliding_attention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Llama/Qwen3: bias on q/k/v/o projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Beginning-of-sequence id.
    #[serde(
        default,
        deserialize_with = "optional_ids",
        skip_serializing_if = "Option::is_none"
    )]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(
        default,
        deserialize_with = "optional_ids",
        skip_serializing_if = "Option::is_none"
    )]
    pub pad_token_id: Option<TokenIds>,
    /// Every other key, checked by the architecture.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl HfConfig {
    /// Reads and parses `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<HfConfig> {
        Self::load_with(dir, &|_| None)
    }

    /// [`HfConfig::load`], filling the keys a wrapper's `text_config` leaves out with
    /// `text_defaults(top-level model_type)` (the defaults of the text model's config class,
    /// which hub checkpoints rely on).
    pub fn load_with(
        dir: &Path,
        text_defaults: &dyn Fn(&str) -> Option<Value>,
    ) -> Result<HfConfig> {
        Self::load_hooked(dir, text_defaults, &|_| &[])
    }

    /// [`HfConfig::load_with`], also renaming a family's own spellings of the common keys:
    /// `aliases(architectures[0])` gives `(family key, common key)` pairs (see
    /// [`HfConfig::parse_hooked`]).
    pub fn load_hooked(
        dir: &Path,
        text_defaults: &dyn Fn(&str) -> Option<Value>,
        aliases: &dyn Fn(&str) -> &'static [(&'static str, &'static str)],
    ) -> Result<HfConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingConfig { path: path.clone() }
            } else {
                ModelError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::parse_hooked(&text, text_defaults, aliases)
            .map_err(|reason| ModelError::BadConfig { path, reason })
    }

    /// Parses config.json text; the error string names the offending field.
    ///
    /// A multimodal wrapper's config (no `hidden_size` at the top, the language model in
    /// `text_config`) is read as one flat config: the text model's keys, plus the top level's
    /// (`architectures` and `model_type` stay the wrapper's; any other key given in both places
    /// must agree). The family then decides what the remaining vision keys mean.
    pub fn from_json_str(text: &str) -> std::result::Result<HfConfig, String> {
        Self::from_json_str_with(text, &|_| None)
    }

    /// [`HfConfig::from_json_str`] with defaults for a wrapper's `text_config` (see
    /// [`HfConfig::load_with`]).
    pub fn from_json_str_with(
        text: &str,
        text_defaults: &dyn Fn(&str) -> Option<Value>,
    ) -> std::result::Result<HfConfig, String> {
        Self::parse_hooked(text, text_defaults, &|_| &[])
    }

    /// [`HfConfig::from_json_str_with`], renaming the keys a family spells its own way
    /// (ChatGLM's `num_layers` for `num_hidden_layers`, ...) to the common names first:
    /// `aliases(architectures[0])` lists `(family key, common key)`. A config giving both
    /// spellings with different values is refused, naming both.
    pub fn parse_hooked(
        text: &str,
        text_defaults: &dyn Fn(&str) -> Option<Value>,
        aliases: &dyn Fn(&str) -> &'static [(&'static str, &'static str)],
    ) -> std::result::Result<HfConfig, String> {
        let value: Value = parse_json(text)?;
        let (mut value, nested) = match flatten_text_config(&value, text_defaults)? {
            Some(flat) => (flat, true),
            None => (value, false),
        };
        let arch = value
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_string);
        let pairs = arch.as_deref().map(aliases).unwrap_or(&[]);
        let renamed = match value.as_object_mut() {
            Some(obj) => rename_keys(obj, pairs)?,
            None => vec![],
        };
        if !nested && renamed.is_empty() {
            return parse_json(text);
        }
        parse_json(&value.to_string()).map_err(|mut e| {
            // A position in the rewritten text would not point into the user's file.
            if let Some(at) = e.find(" at line ") {
                e.truncate(at);
            }
            // Name the key as the user's file spells it (also a missing one).
            for (from, to) in &renamed {
                e = e.replace(&format!("field `{to}`"), &format!("field `{from}`"));
            }
            for (from, to) in pairs {
                e = e.replace(
                    &format!("missing field `{to}`"),
                    &format!("missing field `{from}`"),
                );
            }
            if nested {
                format!("{e} (in `text_config`)")
            } else {
                e
            }
        })
    }

    /// `architectures[0]`, the registry key.
    pub fn architecture(&self) -> Option<&str> {
        self.architectures.first().map(String::as_str)
    }

    /// The storage dtype, from either layout (`dtype` wins when both are present and agree).
    pub fn storage_dtype(&self) -> std::result::Result<Option<&str>, String> {
        match (&self.dtype, &self.torch_dtype) {
            (Some(a), Some(b)) if a != b => {
                Err(format!("`dtype` ({a}) and `torch_dtype` ({b}) disagree"))
            }
            (Some(a), _) => Ok(Some(a)),
            (None, Some(b)) => Ok(Some(b)),
            (None, None) => Ok(None),
        }
    }
}

/// Renames `(from, to)` keys of `obj` (both present with different values is an error);
/// returns the pairs that were renamed.
fn rename_keys<'p>(
    obj: &mut serde_json::Map<String, Value>,
    pairs: &[(&'p str, &'p str)],
) -> std::result::Result<Vec<(&'p str, &'p str)>, String> {
    let mut done = vec![];
    for &(from, to) in pairs {
        let Some(v) = obj.remove(from) else {
            continue;
        };
        match obj.get(to) {
            Some(w) if !w.is_null() && *w != v => {
                return Err(format!("`{from}` ({v}) contradicts `{to}` ({w})"));
            }
            _ => {
                obj.insert(to.to_string(), v);
                done.push((from, to));
            }
        }
    }
    Ok(done)
}

/// The flat view of a wrapper config whose language model is in `text_config`, or `None` when
/// the config is flat already.
fn flatten_text_config(
    value: &Value,
    text_defaults: &dyn Fn(&str) -> Option<Value>,
) -> std::result::Result<Option<Value>, String> {
    let Some(top) = value.as_object() else {
        return Ok(None);
    };
    let Some(text) = top.get("text_config").and_then(Value::as_object) else {
        return Ok(None);
    };
    if top.contains_key("hidden_size") {
        return Ok(None);
    }
    let mut flat = text.clone();
    let model_type = top.get("model_type").and_then(Value::as_str).unwrap_or("");
    if let Some(Value::Object(defaults)) = text_defaults(model_type) {
        for (k, v) in defaults {
            flat.entry(k).or_insert(v);
        }
    }
    for (k, v) in top {
        if k == "text_config" {
            continue;
        }
        let wrapper_key = matches!(
            k.as_str(),
            "architectures"
                | "model_type"
                | "_name_or_path"
                | "transformers_version"
                | "id2label"
                | "label2id"
        );
        match flat.get(k) {
            Some(inner) if !wrapper_key && !inner.is_null() && !v.is_null() && inner != v => {
                return Err(format!(
                    "`{k}` ({v}) contradicts `text_config.{k}` ({inner})"
                ));
            }
            Some(inner) if !wrapper_key && v.is_null() && !inner.is_null() => {}
            _ => {
                flat.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(Some(Value::Object(flat)))
}

/// Parses JSON into `T`; a value of the wrong type or range is reported with its field path
/// (`hidden_size: invalid type: string "64", expected usize at line 3 column 21`), which serde
/// alone does not say.
fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path.is_empty() || path == "." {
            e.into_inner().to_string()
        } else {
            format!("field `{path}`: {}", e.into_inner())
        }
    })?;
    // Trailing text after the object (serde_json::from_str refuses it too).
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// The parts of `generation_config.json` that change what `generate` does by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Stop ids (may differ from config.json's, e.g. instruct models add `<|im_end|>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Beginning-of-sequence id.
    #[serde(
        default,
        deserialize_with = "optional_ids",
        skip_serializing_if = "Option::is_none"
    )]
    pub bos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(
        default,
        deserialize_with = "optional_ids",
        skip_serializing_if = "Option::is_none"
    )]
    pub pad_token_id: Option<TokenIds>,
    /// Default sampling switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Default temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Default top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Default top-p.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Default repetition penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Anything else (ignored: it cannot change the logits).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl GenerationConfig {
    /// Reads `<dir>/generation_config.json`; a missing file is not an error (defaults apply).
    pub fn load(dir: &Path) -> Result<Option<GenerationConfig>> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_json(&text)
                .map(Some)
                .map_err(|reason| ModelError::BadConfig { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ModelError::Io { path, source }),
        }
    }
}
