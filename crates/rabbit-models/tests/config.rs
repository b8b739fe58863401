//! config.json / generation_config.json: type errors name the field and the file, and values that
//! would make the numerics meaningless (NaN/inf logits, divisions by zero, overflowing sizes) or
//! that contradict each other are refused by name at load.

use rabbit_models::{load_spec, spec_from_config, HfConfig, ModelError};
use serde_json::{json, Value};

fn base(arch: &str) -> Value {
    let model_type = match arch {
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        "MistralForCausalLM" => "mistral",
        _ => "llama",
    };
    json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    })
}

/// `base(arch)` with `patch`'s keys set (a `null` removes the key).
fn with(arch: &str, patch: Value) -> Value {
    let mut cfg = base(arch);
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            cfg.as_object_mut().unwrap().remove(k);
        } else {
            cfg[k] = v.clone();
        }
    }
    cfg
}

fn resolve(cfg: &Value) -> Result<rabbit_models::ModelSpec, String> {
    let parsed = HfConfig::from_json_str(&cfg.to_string())?;
    spec_from_config(&parsed, None).map_err(|e| e.to_string())
}

#[test]
fn the_base_configs_are_valid() {
    for arch in [
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
    ] {
        resolve(&base(arch)).unwrap_or_else(|e| panic!("{arch}: {e}"));
    }
}

/// A value of the wrong type or range names its field (and, from a file, the file).
#[test]
fn type_errors_name_the_field_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (json!({"hidden_size": "64"}), "hidden_size", "string"),
        (json!({"hidden_size": -1}), "hidden_size", "-1"),
        (
            json!({"num_hidden_layers": 2.5}),
            "num_hidden_layers",
            "2.5",
        ),
        (json!({"rms_norm_eps": "small"}), "rms_norm_eps", "string"),
        (json!({"eos_token_id": "end"}), "eos_token_id", "TokenIds"),
        (
            json!({"layer_types": ["full_attention", 3]}),
            "layer_types",
            "3",
        ),
        (
            json!({"tie_word_embeddings": "yes"}),
            "tie_word_embeddings",
            "yes",
        ),
    ];
    for (patch, field, detail) in cases {
        let cfg = with("LlamaForCausalLM", patch.clone());
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let e = load_spec(dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadConfig { .. }), "{patch}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("`{field}")),
            "{patch}: does not name `{field}`: {msg}"
        );
        assert!(msg.contains(detail), "{patch}: {msg}");
        assert!(msg.contains("config.json"), "{patch}: no file in {msg}");
    }
    std::fs::write(
        dir.path().join("config.json"),
        base("LlamaForCausalLM").to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"temperature": "hot"}"#,
    )
    .unwrap();
    let msg = load_spec(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("generation_config.json") && msg.contains("`temperature`"),
        "{msg}"
    );
}

/// Values that would give NaN/inf logits or a division by zero, each refused naming its field.
#[test]
fn nonsensical_values_are_refused_by_name() {
    let llama = "LlamaForCausalLM";
    let cases = [
        (llama, json!({"rope_theta": 0.0}), "rope_theta"),
        (llama, json!({"rope_theta": -10000.0}), "rope_theta"),
        (
            llama,
            json!({"rope_theta": null, "rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}),
            "rope_theta",
        ),
        (llama, json!({"rms_norm_eps": 0.0}), "rms_norm_eps"),
        (llama, json!({"eos_token_id": 1_000_000}), "eos_token_id"),
        (
            llama,
            json!({"eos_token_id": [2, 1_000_000]}),
            "eos_token_id",
        ),
        (llama, json!({"rms_norm_eps": -1e-6}), "rms_norm_eps"),
        (llama, json!({"hidden_size": 0}), "hidden_size"),
        (
            llama,
            json!({"num_attention_heads": 0}),
            "num_attention_heads",
        ),
        (
            llama,
            json!({"num_key_value_heads": 0}),
            "num_key_value_heads",
        ),
        (llama, json!({"head_dim": 0}), "head_dim"),
        (llama, json!({"head_dim": 15}), "head_dim"),
        (llama, json!({"vocab_size": 0}), "vocab_size"),
        (llama, json!({"intermediate_size": 0}), "intermediate_size"),
        (llama, json!({"num_hidden_layers": 0}), "num_hidden_layers"),
        (
            llama,
            json!({"max_position_embeddings": 0}),
            "max_position_embeddings",
        ),
        (
            llama,
            json!({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}),
            "factor",
        ),
        (
            llama,
            json!({"rope_scaling": {"rope_type": "dynamic", "factor": -2.0}}),
            "factor",
        ),
        (
            llama,
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0,
                                    "original_max_position_embeddings": 64}}),
            "attention_factor",
        ),
        (
            llama,
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 0}}),
            "original_max_position_embeddings",
        ),
        (
            llama,
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
            "low_freq_factor",
        ),
        (
            "MistralForCausalLM",
            json!({"sliding_window": 0}),
            "sliding_window",
        ),
        (
            llama,
            json!({"vocab_size": 1u64 << 40, "hidden_size": 1u64 << 40, "head_dim": null}),
            "sizes too large",
        ),
    ];
    for (arch, patch, field) in cases {
        let e = match resolve(&with(arch, patch.clone())) {
            Ok(spec) => panic!("{arch} {patch}: accepted as {spec:?}"),
            Err(e) => e,
        };
        assert!(
            e.contains(field),
            "{arch} {patch}: does not name {field}: {e}"
        );
    }
}

/// Fields that contradict each other are refused naming both.
#[test]
fn contradictory_fields_are_refused_naming_both() {
    let cases = [
        (
            "LlamaForCausalLM",
            json!({"num_key_value_heads": 3}),
            ["num_attention_heads", "num_key_value_heads"],
        ),
        (
            "LlamaForCausalLM",
            json!({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": null}),
            ["hidden_size", "num_attention_heads"],
        ),
        (
            "LlamaForCausalLM",
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
            ["high_freq_factor", "low_freq_factor"],
        ),
        (
            "LlamaForCausalLM",
            json!({"dtype": "float32", "torch_dtype": "bfloat16"}),
            ["dtype", "torch_dtype"],
        ),
        (
            "LlamaForCausalLM",
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
            ["rope_theta", "rope settings"],
        ),
        (
            "MistralForCausalLM",
            json!({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}),
            ["layer_types[0]", "sliding_window"],
        ),
        (
            "MistralForCausalLM",
            json!({"sliding_window": null, "layer_types": ["sliding_attention", "sliding_attention"]}),
            ["layer_types[0]", "sliding_window"],
        ),
        (
            "Qwen2ForCausalLM",
            json!({"layer_types": ["full_attention"]}),
            ["layer_types", "num_hidden_layers"],
        ),
        (
            "Qwen2ForCausalLM",
            json!({"layer_types": ["full_attention", "sliding_attention"]}),
            ["layer_types[1]", "use_sliding_window"],
        ),
        (
            "Qwen2ForCausalLM",
            json!({"model_type": "llama"}),
            ["model_type", "architecture"],
        ),
    ];
    for (arch, patch, fields) in cases {
        let e = match resolve(&with(arch, patch.clone())) {
            Ok(spec) => panic!("{arch} {patch}: accepted as {spec:?}"),
            Err(e) => e,
        };
        for f in fields {
            assert!(e.contains(f), "{arch} {patch}: does not name {f}: {e}");
        }
    }
}

/// What transformers accepts and runs the same way stays accepted: a disabled window with any
/// value, Mistral's `layer_types` when they agree with its window, the Qwen2 window layers.
#[test]
fn consistent_window_settings_resolve_like_transformers() {
    let spec = resolve(&with(
        "Qwen2ForCausalLM",
        json!({"use_sliding_window": false, "sliding_window": 4096, "max_window_layers": 1}),
    ))
    .unwrap();
    assert_eq!(spec.sliding_windows, vec![None, None]);
    let spec = resolve(&with(
        "Qwen2ForCausalLM",
        json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1}),
    ))
    .unwrap();
    assert_eq!(spec.sliding_windows, vec![None, Some(8)]);
    let spec = resolve(&with(
        "MistralForCausalLM",
        json!({"sliding_window": 8, "layer_types": ["sliding_attention", "sliding_attention"]}),
    ))
    .unwrap();
    assert_eq!(spec.sliding_windows, vec![Some(8), Some(8)]);
    // transformers: `use_sliding_window` without a window size is full attention everywhere.
    let spec = resolve(&with(
        "Qwen2ForCausalLM",
        json!({"use_sliding_window": true, "sliding_window": null}),
    ))
    .unwrap();
    assert!(spec.sliding_windows.iter().all(Option::is_none));
    // Old checkpoints: `pad_token_id: -1` means none; `max_sequence_length` is harmless.
    let spec = resolve(&with(
        "LlamaForCausalLM",
        json!({"pad_token_id": -1, "bos_token_id": 1, "max_sequence_length": 2048}),
    ))
    .unwrap();
    assert_eq!((spec.pad_token_id, spec.bos_token_id), (None, Some(1)));
    // llama3 rope with high < low: transformers warns and computes (empty smoothing band).
    resolve(&with(
        "LlamaForCausalLM",
        json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                "high_freq_factor": 1.0, "original_max_position_embeddings": 64}}),
    ))
    .unwrap();
    // A window longer than any context is no window, kept in range of the executor's i64 masks.
    let spec = resolve(&with(
        "MistralForCausalLM",
        json!({"sliding_window": 9_223_372_036_854_775_808u64}),
    ))
    .unwrap();
    assert!(spec
        .sliding_windows
        .iter()
        .all(|w| w.is_some_and(|w| w <= 1 << 40)));
    let spec = resolve(&with("MistralForCausalLM", json!({"sliding_window": null}))).unwrap();
    assert_eq!(spec.sliding_windows, vec![None, None]);
}

/// Mixture-of-experts keys: each bad value is refused naming its field; the two spellings of
/// the expert count are read and must agree.
#[test]
fn moe_fields_are_checked_by_name() {
    let moe = |patch: Value| {
        let mut cfg = base("LlamaForCausalLM");
        cfg["architectures"] = json!(["Qwen3MoeForCausalLM"]);
        cfg["model_type"] = json!("qwen3_moe");
        for (k, v) in [
            ("num_experts", json!(8)),
            ("num_experts_per_tok", json!(2)),
            ("moe_intermediate_size", json!(32)),
        ] {
            cfg[k] = v;
        }
        for (k, v) in patch.as_object().unwrap() {
            cfg[k.as_str()] = v.clone();
        }
        cfg
    };
    let spec = resolve(&moe(json!({"decoder_sparse_step": 2}))).unwrap();
    assert_eq!(spec.moe.as_ref().unwrap().sparse_layers, vec![false, true]);
    let spec = resolve(&moe(json!({"num_experts": null, "num_local_experts": 6}))).unwrap_err();
    assert!(spec.contains("`num_experts` is null"), "{spec}");
    let mut cfg = moe(json!({}));
    cfg.as_object_mut().unwrap().remove("num_experts");
    cfg["num_local_experts"] = json!(6);
    assert_eq!(resolve(&cfg).unwrap().moe.unwrap().num_experts, 6);
    for (patch, needle) in [
        (json!({"num_local_experts": 6}), "disagree"),
        (json!({"num_experts_per_tok": 9}), "num_experts_per_tok"),
        (json!({"num_experts_per_tok": 0}), "num_experts_per_tok"),
        (json!({"moe_intermediate_size": 0}), "moe_intermediate_size"),
        (json!({"decoder_sparse_step": 0}), "decoder_sparse_step"),
        (json!({"decoder_sparse_step": null}), "decoder_sparse_step"),
        (json!({"mlp_only_layers": [5]}), "mlp_only_layers"),
        (json!({"use_sliding_window": true}), "use_sliding_window"),
        (json!({"num_experts": "eight"}), "num_experts"),
    ] {
        let e = resolve(&moe(patch.clone())).unwrap_err();
        assert!(e.contains(needle), "{patch}: {e}");
    }
}
