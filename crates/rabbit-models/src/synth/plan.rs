//! Planning: options → the exact config, generation config, model spec and shard layout that
//! will be written, all validated before anything touches disk.

use serde_json::{json, Value};

use super::presets::{find_preset, Family};
use super::stamp::StampOptions;
use super::{
    synthetic_tokenizer, weights, SynthDtype, SynthError, SynthOptions, SynthOverrides,
    SynthTokenizer, TRANSFORMERS_VERSION,
};
use crate::arch::SynthShape;
use crate::config::{GenerationConfig, HfConfig};
use crate::error::ModelError;
use crate::registry::{parse_config, spec_from_config};
use crate::spec::ModelSpec;

/// A fully validated synthesis job: what will be written, before anything is.
#[derive(Debug, Clone)]
pub struct SynthPlan {
    /// The config.json that will be written.
    pub config_json: Value,
    /// The same, parsed.
    pub config: HfConfig,
    /// The generation_config.json that will be written.
    pub generation_config_json: Value,
    /// The resolved model.
    pub spec: ModelSpec,
    /// Parameters (embedding counted once when tied).
    pub num_parameters: u64,
    /// Bytes of tensor data.
    pub weight_bytes: u64,
    /// Weight file names.
    pub weight_files: Vec<String>,
    /// Tokens of the synthetic tokenizer.
    pub tokenizer_size: usize,
    pub(super) shards: Vec<weights::ShardPlan>,
    pub(super) stamp: StampOptions,
    pub(super) dtype: SynthDtype,
    pub(super) seed: u64,
}

pub(super) fn tokenizer() -> Result<&'static SynthTokenizer, SynthError> {
    synthetic_tokenizer().map_err(|reason| SynthError::Tokenizer { reason })
}

fn overrides_cli(o: &SynthOverrides) -> String {
    let mut s = String::new();
    let mut add = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            s.push_str(&format!(" --{flag} {v}"));
        }
    };
    add("layers", o.layers.map(|v| v.to_string()));
    add("hidden", o.hidden.map(|v| v.to_string()));
    add("intermediate", o.intermediate.map(|v| v.to_string()));
    add("heads", o.heads.map(|v| v.to_string()));
    add("kv-heads", o.kv_heads.map(|v| v.to_string()));
    add("head-dim", o.head_dim.map(|v| v.to_string()));
    add("vocab", o.vocab.map(|v| v.to_string()));
    add("max-position", o.max_position.map(|v| v.to_string()));
    add(
        "tie-word-embeddings",
        o.tie_word_embeddings.map(|v| v.to_string()),
    );
    add("rope-theta", o.rope_theta.map(|v| v.to_string()));
    add("experts", o.experts.map(|v| v.to_string()));
    add(
        "experts-per-token",
        o.experts_per_token.map(|v| v.to_string()),
    );
    add(
        "moe-intermediate",
        o.moe_intermediate.map(|v| v.to_string()),
    );
    s
}

/// Applies the mixture-of-experts overrides to a config that has the family's keys, naming the
/// flag a dense family cannot take.
fn apply_moe_overrides(
    cfg: &mut serde_json::Map<String, Value>,
    o: &SynthOverrides,
    family: &str,
) -> Result<(), SynthError> {
    let mut set = |option: &'static str, keys: &[&str], v: Option<usize>| {
        let Some(v) = v else { return Ok(()) };
        match keys.iter().find(|k| cfg.contains_key(**k)) {
            Some(k) => {
                cfg.insert(k.to_string(), json!(v));
                Ok(())
            }
            None => Err(SynthError::InvalidOption {
                option,
                reason: format!("{family} is not a mixture of experts"),
            }),
        }
    };
    set(
        "--experts",
        &["num_experts", "num_local_experts", "n_routed_experts"],
        o.experts,
    )?;
    set(
        "--experts-per-token",
        &["num_experts_per_tok"],
        o.experts_per_token,
    )?;
    // Mixtral's experts are `intermediate_size` wide: --intermediate says it there.
    set(
        "--moe-intermediate",
        &["moe_intermediate_size"],
        o.moe_intermediate,
    )
}

/// Validates the options and computes everything that will be written (nothing touches disk).
pub fn plan(opts: &SynthOptions) -> Result<SynthPlan, SynthError> {
    let family = Family::parse(&opts.arch)?;
    let p = find_preset(family, &opts.preset)?;
    let o = &opts.overrides;
    let tok = tokenizer()?;
    if opts.shards == 0 {
        return Err(SynthError::InvalidOption {
            option: "--shards",
            reason: "must be at least 1".into(),
        });
    }

    let hidden = o.hidden.unwrap_or(p.hidden);
    let layers = o.layers.unwrap_or(p.layers);
    let heads = o.heads.unwrap_or(p.heads);
    let kv_heads = o.kv_heads.unwrap_or(p.kv_heads);
    let intermediate = o.intermediate.unwrap_or(p.intermediate);
    let max_position = o.max_position.unwrap_or(p.max_position);
    let rope_theta = o.rope_theta.unwrap_or(p.rope_theta);
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(SynthError::InvalidOption {
            option: "--rope-theta",
            reason: format!("must be a positive number, got {rope_theta}"),
        });
    }
    let min_vocab = tok.len();
    let vocab = o
        .vocab
        .or(p.vocab)
        .unwrap_or(min_vocab.next_multiple_of(64));
    if vocab < min_vocab {
        return Err(SynthError::InvalidOption {
            option: "--vocab",
            reason: format!(
                "{vocab} is smaller than the synthetic tokenizer, which has {min_vocab} tokens"
            ),
        });
    }
    let divisible = hidden.checked_rem(heads) == Some(0);
    let explicit_head_dim = o.head_dim.or(p.head_dim);
    let head_dim = explicit_head_dim.unwrap_or(hidden / heads.max(1));
    let shape = SynthShape {
        layers,
        hidden,
        heads,
        head_dim,
    };
    let family_keys = family
        .0
        .synth_config(&shape)
        .expect("Family::parse only yields synthesisable families");
    let fixed_kv = family_keys
        .get("num_key_value_heads")
        .and_then(Value::as_u64);
    if let (Some(want), Some(fixed)) = (o.kv_heads, fixed_kv) {
        if want as u64 != fixed {
            return Err(SynthError::InvalidOption {
                option: "--kv-heads",
                reason: format!(
                    "{} has latent attention: its key/value heads are its {heads} query heads",
                    family.key()
                ),
            });
        }
    }
    if explicit_head_dim.is_none() && !divisible && family_keys.contains_key("head_dim") {
        return Err(SynthError::InvalidOption {
            option: "--head-dim",
            reason: format!(
                "{} needs a head_dim: hidden size {hidden} is not divisible by {heads} heads",
                family.key()
            ),
        });
    }

    let endoftext = tok.endoftext_id();
    let im_end = tok.im_end_id();
    let mut cfg = serde_json::Map::new();
    let mut set = |k: &str, v: Value| {
        cfg.insert(k.to_string(), v);
    };
    set("architectures", json!([family.architecture()]));
    set("attention_dropout", json!(0.0));
    set("bos_token_id", json!(endoftext));
    set("eos_token_id", json!(im_end));
    set("hidden_act", json!("silu"));
    set("hidden_size", json!(hidden));
    set("initializer_range", json!(0.02));
    set("intermediate_size", json!(intermediate));
    set("max_position_embeddings", json!(max_position));
    set("model_type", json!(family.0.variant().model_type));
    set("num_attention_heads", json!(heads));
    set("num_hidden_layers", json!(layers));
    set("num_key_value_heads", json!(kv_heads));
    set("rms_norm_eps", json!(p.rms_norm_eps));
    set("rope_theta", json!(rope_theta));
    set("rope_scaling", Value::Null);
    set("torch_dtype", json!(opts.dtype.torch_name()));
    set("transformers_version", json!(TRANSFORMERS_VERSION));
    set("use_cache", json!(true));
    set("vocab_size", json!(vocab));
    if explicit_head_dim.is_some() {
        set("head_dim", json!(head_dim));
    }
    // The family's own keys, then the real model's differences; `null` removes a key.
    let preset_keys: serde_json::Map<String, Value> =
        serde_json::from_str(p.extra).expect("presets hold JSON objects");
    for (k, v) in family_keys.into_iter().chain(preset_keys) {
        if v.is_null() {
            cfg.remove(&k);
        } else {
            cfg.insert(k, v);
        }
    }
    apply_moe_overrides(&mut cfg, o, family.key())?;
    // Asked for, else the preset's, else the family's synthetic default, else transformers'.
    let tied = o
        .tie_word_embeddings
        .or(p.tied)
        .or(cfg.get("tie_word_embeddings").and_then(Value::as_bool))
        .unwrap_or(family.0.variant().tied_by_default);
    cfg.insert("tie_word_embeddings".into(), json!(tied));
    family.0.synth_finish(&mut cfg);
    let config_json = Value::Object(cfg);
    let generation_config_json = json!({
        "bos_token_id": endoftext,
        "do_sample": false,
        "eos_token_id": [endoftext, im_end],
        "pad_token_id": endoftext,
        "transformers_version": TRANSFORMERS_VERSION
    });

    let stamp = StampOptions {
        arch: family.key().to_string(),
        preset: p.name.to_string(),
        shards: opts.shards,
        dtype: opts.dtype,
        seed: opts.seed,
        overrides: o.clone(),
    };
    let invalid = |source: ModelError| SynthError::InvalidConfig {
        request: format!(
            "--arch {} --preset {}{}",
            family.key(),
            p.name,
            overrides_cli(o)
        ),
        source: Box::new(source),
    };
    let config: HfConfig = parse_config(&config_json.to_string()).map_err(|reason| {
        invalid(ModelError::BadConfig {
            path: "config.json".into(),
            reason,
        })
    })?;
    let gen: GenerationConfig =
        serde_json::from_value(generation_config_json.clone()).map_err(|e| {
            invalid(ModelError::BadConfig {
                path: "generation_config.json".into(),
                reason: e.to_string(),
            })
        })?;
    let spec = spec_from_config(&config, Some(&gen)).map_err(invalid)?;
    // A family without grouped keys writes as many key/value heads as heads: an explicit
    // other count cannot be honoured.
    if let Some(kv) = o.kv_heads.filter(|&kv| kv != spec.num_kv_heads) {
        return Err(SynthError::InvalidOption {
            option: "--kv-heads",
            reason: format!(
                "{} has no grouped keys: its key/value heads are its {} heads, not {kv}",
                family.key(),
                spec.num_heads
            ),
        });
    }

    let tensors = spec.tensor_shapes();
    if opts.shards > tensors.len() {
        return Err(SynthError::InvalidOption {
            option: "--shards",
            reason: format!(
                "{} shards requested but the model has only {} tensors",
                opts.shards,
                tensors.len()
            ),
        });
    }
    let shards = weights::plan_shards(&tensors, opts.dtype.size_bytes(), opts.shards);
    Ok(SynthPlan {
        num_parameters: spec.num_parameters(),
        weight_bytes: shards.iter().map(|s| s.data_bytes).sum(),
        weight_files: shards.iter().map(|s| s.file_name.clone()).collect(),
        tokenizer_size: tok.len(),
        config_json,
        config,
        generation_config_json,
        spec,
        shards,
        stamp,
        dtype: opts.dtype,
        seed: opts.seed,
    })
}
