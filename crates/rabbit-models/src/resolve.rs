//! The shared config resolution ([`Resolver`]): the keys every family has (sizes, heads, rope,
//! sliding windows, dtype, token ids), checked and defaulted as the family's [`Variant`] says;
//! any key neither the family nor this code takes is refused by name.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::arch::{unsupported, SlidingPolicy, Variant};
use crate::blocks::{Activation, AttentionSpec, LayerProgram, Norm, NormKind, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::rope::RopeSpec;
use crate::spec::{GenerationDefaults, ModelSpec};

/// Keys written by transformers for every model that have no effect on inference.
const COMMON_HARMLESS_KEYS: &[&str] = &[
    "_name_or_path",
    // Where the original (remote) modeling code lives; rabbitllm runs its own.
    "auto_map",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "architectures",
    "finetuning_task",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "sep_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "pruned_heads",
    "torch_dtype",
    "keys_to_ignore_at_inference",
    // Generation defaults some configs still carry; generation_config.json is authoritative.
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "tf_legacy_loss",
    "use_bfloat16",
    // LLaMA-1-era name of the context length; `max_position_embeddings` is what is used.
    "max_sequence_length",
];

/// The shared resolution of a config, parameterised by the family's [`Variant`]. A family first
/// [`take`](Resolver::take)s the keys only it has, then calls [`base`](Resolver::base), which
/// refuses every key nobody took and resolves the common ones into a spec with the Llama
/// lineage's blocks; the family then sets its own blocks and tensors.
pub struct Resolver<'a> {
    v: &'static Variant,
    cfg: &'a HfConfig,
    gen: Option<&'a GenerationConfig>,
    extra: BTreeMap<String, Value>,
    period: Option<usize>,
    rope_params: Option<Value>,
    kv_heads: Option<usize>,
    head_dim: Option<usize>,
    max_positions: Option<usize>,
}

impl<'a> Resolver<'a> {
    /// Starts resolving `cfg` for the family `v`.
    pub fn new(v: &'static Variant, cfg: &'a HfConfig, gen: Option<&'a GenerationConfig>) -> Self {
        Resolver {
            v,
            cfg,
            gen,
            extra: cfg.extra.clone(),
            period: None,
            rope_params: None,
            kv_heads: None,
            head_dim: None,
            max_positions: None,
        }
    }

    /// The family.
    pub fn variant(&self) -> &'static Variant {
        self.v
    }

    /// Takes a family-specific key out of the config (`None` when absent or null), parsed as
    /// `T`; a value of the wrong type is refused by name.
    pub fn take<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        self.take_or(key, None)
    }

    /// [`take`](Resolver::take), with `default` when the key is absent (an explicit `null`
    /// still gives `None`: transformers reads it as "off").
    pub fn take_or<T: DeserializeOwned>(
        &mut self,
        key: &str,
        default: Option<T>,
    ) -> Result<Option<T>> {
        match self.extra.remove(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| unsupported(self.v, format!("field `{key}` ({v}): {e}"))),
        }
    }

    /// Sets the [`SlidingPolicy::Pattern`] period from the family's own key.
    pub fn set_pattern_period(&mut self, period: usize) -> Result<()> {
        if period == 0 {
            return Err(unsupported(
                self.v,
                "`sliding_window_pattern` must be positive",
            ));
        }
        self.period = Some(period);
        Ok(())
    }

    /// Uses these rope settings instead of the config's `rope_parameters`/`rope_scaling` (for a
    /// family whose settings are keyed by layer type).
    pub fn set_rope_params(&mut self, params: Option<Value>) {
        self.rope_params = params;
    }

    /// Sets the number of key/value heads from the family's own keys (ChatGLM's
    /// `multi_query_group_num` counts only with `multi_query_attention`).
    pub fn set_kv_heads(&mut self, n: usize) {
        self.kv_heads = Some(n);
    }

    /// The per-head width the rope rotates, from the family's own keys (DeepSeek's
    /// `qk_rope_head_dim`); config.json's `head_dim` is then the family's to check.
    pub fn set_head_dim(&mut self, d: usize) {
        self.head_dim = Some(d);
    }

    /// The context length when config.json has no `max_position_embeddings` (the family's own
    /// key or its config class's default).
    pub fn set_max_positions(&mut self, n: usize) {
        self.max_positions = Some(n);
    }

    /// Resolves the common keys; every key not taken by the family and not harmless is refused.
    pub fn base(self) -> Result<ModelSpec> {
        resolve(self)
    }
}

/// Resolves the rope of a family from explicit settings (`params` as in config.json).
pub fn rope_from(
    v: &Variant,
    cfg: &HfConfig,
    theta: f64,
    head_dim: usize,
    params: Option<&Value>,
    max_positions: usize,
) -> Result<RopeSpec> {
    RopeSpec::from_config(
        theta,
        head_dim,
        cfg.partial_rotary_factor,
        v.partial_rotary,
        params,
        max_positions,
    )
    .map_err(|e| unsupported(v, e))
}

fn resolve(mut r: Resolver<'_>) -> Result<ModelSpec> {
    let (v, cfg, gen) = (r.v, r.cfg, r.gen);
    let (act_key, act_default) = v.activation;
    let act_name: Option<String> = if act_key == "hidden_act" {
        cfg.hidden_act.clone()
    } else {
        r.take(act_key)?
    };
    let quantized = match r.extra.remove("quantization_config") {
        None | Some(Value::Null) => None,
        Some(q) => Some(crate::quant::quantized(v, &q)?),
    };
    let fp8_block = match quantized {
        Some(crate::quant::Quantized::Fp8Block(b)) => Some(b),
        _ => None,
    };
    let mxfp4 = quantized == Some(crate::quant::Quantized::Mxfp4);
    // Refuse fields that would change the numerics in a way we do not implement.
    for key in r.extra.keys() {
        if COMMON_HARMLESS_KEYS.contains(&key.as_str()) || v.harmless_keys.contains(&key.as_str()) {
            continue;
        }
        let hint = " (rabbitllm does not know what it changes and refuses to guess)";
        return Err(unsupported(
            v,
            format!("field `{key}` is not supported{hint}"),
        ));
    }
    if let Some(mt) = &cfg.model_type {
        if mt != v.model_type {
            return Err(unsupported(
                v,
                format!(
                    "model_type `{mt}` contradicts the architecture (expected `{}`)",
                    v.model_type
                ),
            ));
        }
    }
    let positive = |name: &str, value: usize| -> Result<usize> {
        if value == 0 {
            Err(unsupported(v, format!("`{name}` must be positive")))
        } else {
            Ok(value)
        }
    };
    let hidden = positive("hidden_size", cfg.hidden_size)?;
    let heads = positive("num_attention_heads", cfg.num_attention_heads)?;
    let kv_heads = positive(
        "num_key_value_heads",
        r.kv_heads.or(cfg.num_key_value_heads).unwrap_or(heads),
    )?;
    positive("num_hidden_layers", cfg.num_hidden_layers)?;
    positive("vocab_size", cfg.vocab_size)?;
    positive("intermediate_size", cfg.intermediate_size)?;
    let max_positions = positive(
        "max_position_embeddings",
        cfg.max_position_embeddings
            .or(r.max_positions)
            .ok_or_else(|| unsupported(v, "config.json has no `max_position_embeddings`"))?,
    )?;
    if heads % kv_heads != 0 {
        return Err(unsupported(
            v,
            format!("`num_attention_heads` ({heads}) is not a multiple of `num_key_value_heads` ({kv_heads})"),
        ));
    }
    let head_dim = match (r.head_dim.or(cfg.head_dim), v.default_head_dim) {
        (Some(d), _) => positive("head_dim", d)?,
        (None, Some(d)) => d,
        (None, None) => {
            if hidden % heads != 0 {
                return Err(unsupported(
                    v,
                    format!("`hidden_size` ({hidden}) is not divisible by `num_attention_heads` ({heads}) and no `head_dim` is given"),
                ));
            }
            hidden / heads
        }
    };
    check_sizes(v, cfg, kv_heads, head_dim)?;
    let activation = match act_name.as_deref() {
        None => act_default,
        Some(name) => Activation::from_name(name).ok_or_else(|| {
            unsupported(
                v,
                format!(
                    "{act_key} `{name}` is not supported (supported: {})",
                    Activation::NAMES
                ),
            )
        })?,
    };
    // Rope: transformers 5 `rope_parameters` or classic `rope_theta` + `rope_scaling`.
    let rope_params = match (&cfg.rope_parameters, &cfg.rope_scaling) {
        _ if r.rope_params.is_some() => r.rope_params.as_ref(),
        (Some(p), Some(s)) if !p.is_null() && !s.is_null() && p != s => {
            return Err(unsupported(
                v,
                "both `rope_parameters` and `rope_scaling` are set and differ",
            ))
        }
        (Some(p), _) if !p.is_null() => Some(p),
        (_, Some(s)) if !s.is_null() => Some(s),
        _ => None,
    };
    if let (Some(t), Some(p)) = (
        cfg.rope_theta,
        rope_params.and_then(|p| p.get("rope_theta")),
    ) {
        if p.as_f64() != Some(t) {
            return Err(unsupported(
                v,
                format!("`rope_theta` ({t}) contradicts rope settings ({p})"),
            ));
        }
    }
    let theta = cfg.rope_theta.unwrap_or(v.default_rope_theta);
    let rope = rope_from(v, cfg, theta, head_dim, rope_params, max_positions)?;

    let layers = cfg.num_hidden_layers;
    let sliding_windows = sliding_windows(v, cfg, layers, r.period)?;

    let storage_dtype = cfg
        .storage_dtype()
        .map_err(|e| unsupported(v, e))?
        .map(str::to_string);
    if let Some(d) = &storage_dtype {
        if !matches!(d.as_str(), "float32" | "bfloat16" | "float16") {
            return Err(unsupported(
                v,
                format!("dtype `{d}` is not supported (float32, bfloat16, float16)"),
            ));
        }
    }

    let first =
        |ids: Option<&crate::config::TokenIds>| ids.and_then(|t| t.to_vec().first().copied());
    let gen_eos = gen.and_then(|g| g.eos_token_id.as_ref());
    let eos_source = if gen_eos.is_some() {
        "generation_config.json's `eos_token_id`"
    } else {
        "`eos_token_id`"
    };
    let eos_token_ids = gen_eos
        .or(cfg.eos_token_id.as_ref())
        .map(|t| t.to_vec())
        .unwrap_or_default();
    if let Some(&bad) = eos_token_ids
        .iter()
        .find(|&&t| t as usize >= cfg.vocab_size)
    {
        // Generation could never emit it: every sequence would run to the length limit.
        return Err(unsupported(
            v,
            format!(
                "{eos_source} {bad} is outside the vocabulary (`vocab_size` {})",
                cfg.vocab_size
            ),
        ));
    }
    let generation = gen
        .map(|g| GenerationDefaults {
            do_sample: g.do_sample,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            repetition_penalty: g.repetition_penalty,
        })
        .unwrap_or_default();
    let rms = cfg.rms_norm_eps.unwrap_or(v.default_rms_norm_eps);
    if !(rms > 0.0 && rms.is_finite()) {
        return Err(unsupported(
            v,
            format!("`rms_norm_eps` must be a positive number, got {rms}"),
        ));
    }
    Ok(ModelSpec {
        architecture: v.name.to_string(),
        vocab_size: cfg.vocab_size,
        hidden_size: hidden,
        intermediate_size: cfg.intermediate_size,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        norm: Norm {
            kind: NormKind::Rms,
            eps: rms,
        },
        activation,
        program: LayerProgram::PreNorm,
        attention: AttentionSpec::plain(head_dim),
        rope,
        local_rope: None,
        max_position_embeddings: max_positions,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(v.tied_by_default),
        storage_dtype,
        sliding_windows,
        embed_scale: None,
        final_logit_softcap: None,
        lm_head_norm: false,
        unbounded_positions: false,
        tensors: TensorLayout::llama_names(vec![]),
        moe: None,
        mla: None,
        fp8_block,
        mxfp4,
        notes: fp8_block
            .map(|[a, b]| {
                format!(
                    "FP8 (E4M3) weights with {a}x{b} block scales are read as stored and dequantized to the compute dtype after each read"
                )
            })
            .into_iter()
            .collect(),
        bos_token_id: gen
            .and_then(|g| first(g.bos_token_id.as_ref()))
            .or(first(cfg.bos_token_id.as_ref())),
        eos_token_ids,
        pad_token_id: gen
            .and_then(|g| first(g.pad_token_id.as_ref()))
            .or(first(cfg.pad_token_id.as_ref())),
        generation,
    })
}

/// Refuses sizes whose tensors could not even be counted: every element count (and the whole
/// model's, at 8 bytes each) must fit in 64 bits, so no later size arithmetic overflows.
fn check_sizes(v: &Variant, cfg: &HfConfig, kv_heads: usize, head_dim: usize) -> Result<()> {
    let n = |x: usize| x as u128;
    let (hidden, inter) = (n(cfg.hidden_size), n(cfg.intermediate_size));
    let q = n(cfg.num_attention_heads).checked_mul(n(head_dim));
    let kv = n(kv_heads).checked_mul(n(head_dim));
    let layer = (|| {
        let attn = q?.checked_mul(hidden)?.checked_mul(2)?;
        let kv = kv?.checked_mul(hidden)?.checked_mul(2)?;
        let mlp = inter.checked_mul(hidden)?.checked_mul(3)?;
        attn.checked_add(kv)?.checked_add(mlp)
    })();
    let total = (|| {
        let layers = layer?.checked_mul(n(cfg.num_hidden_layers))?;
        let embed = n(cfg.vocab_size).checked_mul(hidden)?.checked_mul(2)?;
        layers.checked_add(embed)?.checked_mul(8)
    })();
    if total.is_none_or(|t| t > u64::MAX as u128) {
        return Err(unsupported(
            v,
            "sizes too large: `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, \
             `num_attention_heads`, `num_key_value_heads` and `head_dim` give more than 2^64 bytes of weights",
        ));
    }
    Ok(())
}

fn sliding_windows(
    v: &Variant,
    cfg: &HfConfig,
    layers: usize,
    period: Option<usize>,
) -> Result<Vec<Option<usize>>> {
    let window = match v.sliding {
        SlidingPolicy::Unsupported => {
            if cfg.use_sliding_window == Some(true) || cfg.sliding_window.is_some() {
                // Llama configs never carry a window; a present one means a different model.
                if cfg.sliding_window.is_some() {
                    return Err(unsupported(
                        v,
                        "`sliding_window` is not supported for this architecture",
                    ));
                }
            }
            None
        }
        SlidingPolicy::QwenStyle => match (cfg.use_sliding_window, cfg.sliding_window) {
            // transformers: no window size means full attention on every layer.
            (Some(true), w) => w,
            _ => None,
        },
        SlidingPolicy::AllLayers => cfg.sliding_window,
        SlidingPolicy::Pattern { default_window, .. } => {
            Some(cfg.sliding_window.unwrap_or(default_window))
        }
    };
    if window == Some(0) {
        return Err(unsupported(v, "`sliding_window` must be positive, got 0"));
    }
    // A window longer than any context is no window; clamping keeps the executor's i64 mask
    // arithmetic from wrapping on absurd values (e.g. 2^63).
    let window = window.map(|w| w.min(1 << 40));
    if let (SlidingPolicy::AllLayers, Some(types)) = (v.sliding, &cfg.layer_types) {
        // transformers' Mistral ignores `layer_types` and windows every layer when
        // `sliding_window` is set: a disagreeing list would silently mean something else.
        let want = if window.is_some() {
            "sliding_attention"
        } else {
            "full_attention"
        };
        if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != want) {
            return Err(unsupported(
                v,
                format!(
                    "`layer_types[{i}]` is `{t}` but `sliding_window` is {} (this architecture uses \
                     `{want}` on every layer)",
                    window.map_or("null".to_string(), |w| w.to_string())
                ),
            ));
        }
    }
    if let Some(types) = &cfg.layer_types {
        if types.len() != layers {
            return Err(unsupported(
                v,
                format!(
                    "`layer_types` has {} entries but num_hidden_layers is {layers}",
                    types.len()
                ),
            ));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => match window {
                    Some(w) => Ok(Some(w)),
                    None => Err(unsupported(
                        v,
                        format!("`layer_types[{i}]` is sliding_attention but no sliding window is in effect (`use_sliding_window`, `sliding_window`)"),
                    )),
                },
                other => Err(unsupported(v, format!("layer_types[{i}] `{other}` is not supported"))),
            })
            .collect();
    }
    Ok((0..layers)
        .map(|i| match (v.sliding, window) {
            (SlidingPolicy::QwenStyle, Some(w)) => {
                let full = cfg.max_window_layers.unwrap_or(v.default_max_window_layers);
                (i >= full).then_some(w)
            }
            (SlidingPolicy::Pattern { period: p, .. }, Some(w)) => {
                ((i + 1) % period.unwrap_or(p) != 0).then_some(w)
            }
            (_, w) => w,
        })
        .collect())
}
