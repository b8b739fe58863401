//! DeepSeek-V2/V3 configs as the hub ships them: every field resolved as transformers reads it,
//! and every field rabbitllm cannot honour refused by name.

#![recursion_limit = "256"]

use rabbit_models::{spec_from_config, HfConfig, Routing};
use serde_json::{json, Value};

/// deepseek-ai/DeepSeek-V3's config.json, less its `quantization_config` (FP8) and `auto_map`.
fn v3() -> Value {
    json!({
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0,
        "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "seq_aux": true, "tie_word_embeddings": false, "topk_group": 4,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
        "use_cache": true, "v_head_dim": 128, "vocab_size": 129280
    })
}

/// deepseek-ai/DeepSeek-V2-Lite's config.json, less its `auto_map`.
fn v2_lite() -> Value {
    json!({
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
        "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
        "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
        "seq_aux": true, "tie_word_embeddings": false, "topk_group": 1,
        "topk_method": "greedy", "torch_dtype": "bfloat16", "transformers_version": "4.39.3",
        "use_cache": true, "v_head_dim": 128, "vocab_size": 102400
    })
}

fn resolve(cfg: &Value) -> Result<rabbit_models::ModelSpec, String> {
    let parsed = HfConfig::from_json_str(&cfg.to_string())?;
    spec_from_config(&parsed, None).map_err(|e| e.to_string())
}

fn patched(mut cfg: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        cfg[k.as_str()] = v.clone();
    }
    cfg
}

#[test]
fn deepseek_v3_resolves_as_transformers_reads_it() {
    let spec = resolve(&v3()).unwrap();
    let mla = spec.mla.unwrap();
    assert_eq!(mla.q_lora_rank, Some(1536));
    assert!(mla.deinterleave, "rope_interleave defaults to true");
    assert_eq!(spec.kv_values_per_token(), 512 + 64);
    assert_eq!((spec.head_dim, spec.rope.dim), (192, 64));
    // 192^-0.5 * (0.1 * ln 40 + 1)^2.
    let m = 0.1 * 40f64.ln() + 1.0;
    assert!((spec.attention.scale - m * m / 192f64.sqrt()).abs() < 1e-12);
    let moe = spec.moe.as_ref().unwrap();
    assert_eq!(
        moe.routing,
        Routing::SigmoidGroupLimited {
            groups: 8,
            topk_groups: 4
        }
    );
    assert!(moe.renormalize && moe.router_f32);
    assert_eq!((moe.scaling, moe.shared.unwrap().intermediate), (2.5, 2048));
    assert_eq!(moe.sparse_layers.iter().filter(|s| !**s).count(), 3);
    assert!(spec.notes.iter().any(|n| n.contains("model.layers.61")));
    assert_eq!(spec.tensors.ignored_prefixes, vec!["model.layers.61."]);
    let names: Vec<String> = spec
        .layer_tensor_shapes(3)
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert!(names.contains(&"model.layers.3.mlp.gate.e_score_correction_bias".to_string()));
    assert!(names.contains(&"model.layers.3.self_attn.q_a_layernorm.weight".to_string()));
    assert!(!spec
        .layer_tensor_shapes(0)
        .iter()
        .any(|t| t.0.contains("experts")));
}

#[test]
fn deepseek_v2_lite_resolves_as_transformers_reads_it() {
    let spec = resolve(&v2_lite()).unwrap();
    let mla = spec.mla.unwrap();
    assert_eq!(mla.q_lora_rank, None);
    assert!(spec.rope.interleaved && spec.rope.rotate_f32);
    assert!(spec.has(rabbit_models::Role::Q) && !spec.has(rabbit_models::Role::QA));
    let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
    assert!((spec.attention.scale - m * m / 192f64.sqrt()).abs() < 1e-12);
    let moe = spec.moe.as_ref().unwrap();
    assert_eq!(moe.routing, Routing::SoftmaxTopK);
    assert!(!moe.renormalize);
    assert_eq!(moe.shared.unwrap().intermediate, 2 * 1408);
    assert!(spec.notes.is_empty());
    let grouped = resolve(&patched(
        v2_lite(),
        json!({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}),
    ))
    .unwrap();
    assert_eq!(
        grouped.moe.unwrap().routing,
        Routing::SoftmaxGroupLimited {
            groups: 8,
            topk_groups: 3
        }
    );
}

#[test]
fn fp8_quantization_configs_are_read_and_others_refused() {
    let fp8 = json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                     "weight_block_size": [128, 128]});
    let spec = resolve(&patched(v3(), json!({ "quantization_config": fp8 }))).unwrap();
    assert_eq!(spec.fp8_block, Some([128, 128]));
    assert!(spec.notes.iter().any(|n| n.contains("FP8")));
    // A 576-row kv_a_proj_with_mqa has 5 block rows (the last one partial).
    let scales: std::collections::BTreeMap<String, Vec<usize>> =
        spec.layer_scale_shapes(0).into_iter().collect();
    assert_eq!(
        scales["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"],
        vec![5, 56]
    );
    assert!(spec
        .layout()
        .units
        .iter()
        .any(|u| u.optional.iter().any(|n| n.ends_with("_scale_inv"))));
    for (q, needle) in [
        (json!({"quant_method": "gptq", "bits": 4}), "quant_method"),
        (
            json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}),
            "fmt",
        ),
        (
            json!({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}),
            "activation_scheme",
        ),
        (
            json!({"quant_method": "fp8", "weight_block_size": [128]}),
            "weight_block_size",
        ),
        (
            json!({"quant_method": "fp8", "weight_block_size": [0, 128]}),
            "weight_block_size",
        ),
        (
            json!({"quant_method": "fp8", "weight_block_size": [128, 128], "kv_cache_scheme": "fp8"}),
            "kv_cache_scheme",
        ),
    ] {
        let e = resolve(&patched(v3(), json!({ "quantization_config": q }))).unwrap_err();
        assert!(
            e.contains("quantization_config") && e.contains(needle),
            "{e}"
        );
    }
}

#[test]
fn deepseek_fields_are_refused_by_name() {
    for (base, patch, needle) in [
        (v3(), json!({"moe_layer_freq": 2}), "moe_layer_freq"),
        (
            v3(),
            json!({"first_k_dense_replace": null}),
            "first_k_dense_replace",
        ),
        (v3(), json!({"topk_method": "greedy"}), "topk_method"),
        (v3(), json!({"scoring_func": "softmax"}), "scoring_func"),
        (v3(), json!({"n_group": 7}), "n_group"),
        (v3(), json!({"topk_group": 9}), "topk_group"),
        (v3(), json!({"n_group": null}), "n_group"),
        (
            v3(),
            json!({"num_experts_per_tok": 300}),
            "num_experts_per_tok",
        ),
        (
            v3(),
            json!({"num_key_value_heads": 8}),
            "num_key_value_heads",
        ),
        (v3(), json!({"head_dim": 128}), "head_dim"),
        (v3(), json!({"qk_head_dim": 128}), "qk_head_dim"),
        (v3(), json!({"qk_rope_head_dim": 63}), "qk_rope_head_dim"),
        (v3(), json!({"kv_lora_rank": 0}), "kv_lora_rank"),
        (v3(), json!({"q_lora_rank": 0}), "q_lora_rank"),
        (v3(), json!({"n_shared_experts": 0}), "n_shared_experts"),
        (
            v3(),
            json!({"routed_scaling_factor": -1.0}),
            "routed_scaling_factor",
        ),
        (v3(), json!({"num_mtp_layers": 2}), "num_mtp_layers"),
        (
            v3(),
            json!({"quantization_config": {"quant_method": "fp8"}}),
            "quantization_config",
        ),
        (v3(), json!({"sliding_window": 4096}), "sliding_window"),
        (v2_lite(), json!({"norm_topk_prob": true}), "norm_topk_prob"),
        (v2_lite(), json!({"topk_method": "noaux_tc"}), "topk_method"),
        (
            v2_lite(),
            json!({"scoring_func": "sigmoid"}),
            "scoring_func",
        ),
        (
            v2_lite(),
            json!({"topk_method": "group_limited_greedy", "n_group": null}),
            "n_group",
        ),
        (
            v2_lite(),
            json!({"num_experts_per_tok": null}),
            "num_experts_per_tok",
        ),
        (v2_lite(), json!({"some_new_field": 1}), "some_new_field"),
    ] {
        let e = resolve(&patched(base, patch.clone())).unwrap_err();
        assert!(e.contains(needle), "{patch}: {e}");
    }
}
