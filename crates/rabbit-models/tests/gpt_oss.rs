//! gpt-oss configs as openai ships them: resolved as transformers reads them, and every field
//! rabbitllm cannot honour refused by name.

use rabbit_models::{spec_from_config, ExpertMlp, HfConfig, Role, Routing};
use serde_json::{json, Value};

/// openai/gpt-oss-20b's config.json, less its `quantization_config` (MXFP4).
fn gpt_oss_20b() -> Value {
    let layer_types: Vec<&str> = (0..24)
        .map(|i| {
            if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    json!({
        "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
        "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
        "intermediate_size": 2880, "layer_types": layer_types, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
        "output_router_logits": false, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn",
                         "truncate": false},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
        "swiglu_limit": 7.0, "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0",
        "use_cache": true, "vocab_size": 201088
    })
}

fn resolve(cfg: &Value) -> Result<rabbit_models::ModelSpec, String> {
    let parsed = HfConfig::from_json_str(&cfg.to_string())?;
    spec_from_config(&parsed, None).map_err(|e| e.to_string())
}

fn patched(patch: Value) -> Value {
    let mut cfg = gpt_oss_20b();
    for (k, v) in patch.as_object().unwrap() {
        cfg[k.as_str()] = v.clone();
    }
    cfg
}

#[test]
fn gpt_oss_20b_resolves_as_transformers_reads_it() {
    let spec = resolve(&gpt_oss_20b()).unwrap();
    let moe = spec.moe.as_ref().unwrap();
    assert_eq!((moe.num_experts, moe.top_k), (32, 4));
    assert_eq!(moe.routing, Routing::TopKSoftmax);
    assert_eq!(
        moe.expert_mlp,
        ExpertMlp::ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0
        }
    );
    assert_eq!(spec.sliding_windows[0], Some(128));
    assert_eq!(spec.sliding_windows[1], None);
    assert!(spec.has(Role::Sinks) && spec.has(Role::Router));
    let layout = spec.layout();
    let stacked = &layout.stacked;
    // Four stacked tensors per layer, 32 parts each.
    assert_eq!(stacked.len(), 4 * 24);
    assert_eq!(stacked[0].tensor, "model.layers.0.mlp.experts.gate_up_proj");
    assert_eq!(
        stacked[0].parts[3],
        "model.layers.0.mlp.experts.gate_up_proj[3]"
    );
    assert_eq!(
        layout.shapes["model.layers.0.mlp.experts.gate_up_proj"],
        vec![32, 2880, 5760]
    );
    assert_eq!(
        layout.groups["model.layers.0.mlp.experts.down_proj_bias[3]"],
        4
    );
}

#[test]
fn gpt_oss_fields_are_refused_by_name() {
    for (patch, needle) in [
        (json!({"experts_per_token": 2}), "experts_per_token"),
        (json!({"swiglu_limit": -1.0}), "swiglu_limit"),
        (json!({"swiglu_alpha": 0}), "swiglu_alpha"),
        (json!({"num_experts_per_tok": 33}), "num_experts_per_tok"),
        (
            json!({"quantization_config": {"quant_method": "bitsandbytes"}}),
            "quantization_config",
        ),
        (json!({"layer_types": ["sliding_attention"]}), "layer_types"),
        (json!({"sliding_window": 0}), "sliding_window"),
    ] {
        let e = resolve(&patched(patch.clone())).unwrap_err();
        assert!(e.contains(needle), "{patch}: {e}");
    }
}

#[test]
fn mxfp4_experts_are_read_by_gpt_oss_only() {
    let mx = json!({"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]});
    let spec = resolve(&patched(json!({ "quantization_config": mx }))).unwrap();
    assert!(spec.mxfp4);
    let names: Vec<String> = spec
        .layer_tensor_shapes(0)
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert!(names.contains(&"model.layers.0.mlp.experts.gate_up_proj_blocks[31]".to_string()));
    assert!(!names.iter().any(|n| n.ends_with("gate_up_proj[0]")));
    let e = resolve(&patched(
        json!({"quantization_config": mx, "hidden_size": 2850}),
    ))
    .unwrap_err();
    assert!(e.contains("multiples of 32"), "{e}");
    let e = resolve(&patched(
        json!({"quantization_config": {"quant_method": "mxfp4", "bits": 4}}),
    ))
    .unwrap_err();
    assert!(e.contains("bits"), "{e}");
    // Another family cannot read MXFP4.
    let mut llama = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128
    });
    llama["quantization_config"] = mx;
    let e = resolve(&llama).unwrap_err();
    assert!(e.contains("mxfp4") && e.contains("LlamaForCausalLM"), "{e}");
}
