//! config.json / generation_config.json: type errors name the field and the file.

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
        (json!({"num_hidden_layers": 2.5}), "num_hidden_layers", "2.5"),
        (json!({"rms_norm_eps": "small"}), "rms_norm_eps", "string"),
        (json!({"eos_token_id": "end"}), "eos_token_id", "TokenIds"),
        (json!({"layer_types": ["full_attention", 3]}), "layer_types", "3"),
        (json!({"tie_word_embeddings": "yes"}), "tie_word_embeddings", "yes"),
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
