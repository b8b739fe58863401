//! Config resolution of the remote-code families (ChatGLM, InternLM2, InternLM, Baichuan 2,
//! QWen v1) on the config.json files of their parity fixtures (`tests/fixtures/*` at the
//! workspace root, written in each family's own key spelling): what each resolves to, and every
//! unknown, contradictory or unsupported field refused by name.

use std::path::Path;

use rabbit_models::registry::parse_config;
use rabbit_models::{alibi_slopes, spec_from_config, ModelSpec, NormKind, Role, RopeScaling};
use serde_json::{json, Value};

fn fixture_config(case: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
        .join("config.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn resolve(cfg: &Value) -> Result<ModelSpec, String> {
    let parsed = parse_config(&cfg.to_string())?;
    spec_from_config(&parsed, None).map_err(|e| e.to_string())
}

/// `base` with `patch` applied (`null` removes a key).
fn with(base: &Value, patch: Value) -> Value {
    let mut cfg = base.clone();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            cfg.as_object_mut().unwrap().remove(k);
        } else {
            cfg[k] = v.clone();
        }
    }
    cfg
}

/// `resolve(base + patch)` fails with a message containing every one of `needles`.
fn refused(base: &Value, patch: Value, needles: &[&str]) {
    let err = resolve(&with(base, patch.clone())).expect_err(&format!("{patch} accepted"));
    for n in needles {
        assert!(err.contains(n), "{patch}: `{err}` does not mention {n}");
    }
}

#[test]
fn chatglm_reads_its_own_key_names() {
    let base = fixture_config("chatglm3");
    let s = resolve(&base).unwrap();
    assert_eq!(s.architecture, "ChatGLMModel");
    assert_eq!(
        (
            s.num_layers,
            s.vocab_size,
            s.intermediate_size,
            s.max_position_embeddings
        ),
        (2, 256, 96, 8192)
    );
    assert_eq!((s.num_heads, s.num_kv_heads, s.head_dim), (4, 2, 16));
    assert_eq!(s.norm.kind, NormKind::RmsWeightF32);
    assert_eq!(s.norm.eps, 1e-5);
    assert!(s.has(Role::Qkv) && s.has(Role::GateUp) && !s.tie_word_embeddings);
    assert_eq!(
        (s.rope.dim, s.rope.theta, s.rope.interleaved),
        (8, 10000.0, true)
    );
    assert_eq!(
        s.tensors.embed_weight(),
        "transformer.embedding.word_embeddings.weight"
    );
    assert!(s.layout().is_ignored("transformer.rotary_pos_emb.inv_freq"));
    // The other class name of the same checkpoints.
    let other = with(
        &base,
        json!({"architectures": ["ChatGLMForConditionalGeneration"]}),
    );
    assert_eq!(resolve(&other).unwrap().num_kv_heads, 2);
    // GLM-4 / ChatGLM3-32k's base.
    let r = resolve(&with(&base, json!({"rope_ratio": 500}))).unwrap();
    assert_eq!(r.rope.theta, 5e6);
    assert!(r.notes.iter().any(|n| n.contains("rope_ratio")));
    // chatglm2-6b-32k's code divides the positions instead.
    let r2 = resolve(&with(
        &base,
        json!({"rope_ratio": 16, "_name_or_path": "THUDM/chatglm2-6b-32k"}),
    ))
    .unwrap();
    assert_eq!(r2.rope.theta, 10000.0);
    assert_eq!(r2.rope.scaling, RopeScaling::Linear { factor: 16.0 });
    // Without multi-query groups, every head has its own k/v, packed per head: regrouped.
    let mha = resolve(&with(&base, json!({"multi_query_attention": false}))).unwrap();
    assert_eq!(mha.num_kv_heads, 4);
    let qkv = mha.tensors.param(Role::Qkv).unwrap();
    assert_eq!(qkv.shape, vec![3 * 64, 64]);
    assert_eq!(
        qkv.row_order.as_deref(),
        Some(&[0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11][..])
    );
    // LayerNorm instead of RMSNorm, biased linears.
    let ln = resolve(&with(
        &base,
        json!({"rmsnorm": false, "add_bias_linear": true}),
    ))
    .unwrap();
    assert_eq!(ln.norm.kind, NormKind::Layer);
    assert!(ln.tensors.final_norm_bias);
    assert!(ln
        .tensors
        .layer
        .iter()
        .filter(|p| !p.role.is_norm())
        .all(|p| p.bias));
    // `add_bias_linear` alone biases query_key_value too (`bias=add_bias_linear or add_qkv_bias`).
    let lin = resolve(&with(
        &base,
        json!({"add_qkv_bias": false, "add_bias_linear": true}),
    ))
    .unwrap();
    assert!(lin.tensors.param(Role::Qkv).unwrap().bias);
}

#[test]
fn chatglm_refuses_what_it_cannot_run_by_name() {
    let base = fixture_config("chatglm3");
    refused(
        &base,
        json!({"num_hidden_layers": 3}),
        &["num_layers", "num_hidden_layers"],
    );
    refused(&base, json!({"num_layers": "two"}), &["num_layers"]);
    refused(&base, json!({"quantization_bit": 4}), &["quantization_bit"]);
    refused(&base, json!({"pre_seq_len": 128}), &["pre_seq_len"]);
    refused(
        &base,
        json!({"post_layer_norm": false}),
        &["post_layer_norm"],
    );
    refused(&base, json!({"original_rope": false}), &["original_rope"]);
    refused(
        &base,
        json!({"apply_residual_connection_post_layernorm": true}),
        &["apply_residual_connection_post_layernorm"],
    );
    refused(&base, json!({"rope_theta": 500000.0}), &["rope_theta"]);
    refused(&base, json!({"rope_ratio": 0}), &["rope_ratio"]);
    refused(&base, json!({"rotary_percent": 0.5}), &["rotary_percent"]);
    refused(&base, json!({"hidden_act": "gelu"}), &["hidden_act"]);
    refused(
        &base,
        json!({"ffn_hidden_size": null}),
        &["ffn_hidden_size"],
    );
    refused(
        &base,
        json!({"multi_query_group_num": 3}),
        &["multi_query_group_num", "divide"],
    );
    // The position of a bad value refers to the user's file, or is left out.
    let e = resolve(&with(&base, json!({"num_layers": "two"}))).unwrap_err();
    assert!(!e.contains("column"), "{e}");
}

#[test]
fn internlm2_regroups_wqkv_and_reads_dynamic_ntk() {
    let base = fixture_config("internlm2");
    let s = resolve(&base).unwrap();
    assert!(matches!(
        s.rope.scaling,
        RopeScaling::Dynamic { factor, max_position_embeddings: 24 } if factor == 2.0
    ));
    // The context is not capped where dynamic NTK is meant to extend it.
    assert_eq!(s.context_limit(), None);
    let layout = s.layout();
    let order = &layout.row_orders;
    assert_eq!(order.len(), 2, "one per layer: {order:?}");
    assert_eq!(order[0].tensor, "model.layers.0.attention.wqkv.weight");
    assert_eq!(order[0].order, vec![0, 1, 4, 5, 2, 6, 3, 7]);
    let biased = resolve(&with(&base, json!({"bias": true}))).unwrap();
    assert_eq!(
        biased.layout().row_orders.len(),
        4,
        "the bias is regrouped too"
    );
    refused(
        &base,
        json!({"rope_scaling": {"type": "ntk", "factor": 2.0}}),
        &["ntk"],
    );
    // InternLM2's code runs only linear / dynamic, with a type and a factor above 1.
    refused(
        &base,
        json!({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 24}}),
        &["rope_scaling"],
    );
    refused(
        &base,
        json!({"rope_scaling": {"factor": 2.0}}),
        &["rope_scaling"],
    );
    refused(
        &base,
        json!({"rope_scaling": {"type": "linear", "factor": 0.5}}),
        &["rope_scaling"],
    );
    refused(
        &base,
        json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
        &["rope_scaling"],
    );
    refused(
        &base,
        json!({"rope_scaling": {"type": "dynamic", "factor": 2}}),
        &["rope_scaling.factor", "float"],
    );
    refused(&base, json!({"sliding_window": 4}), &["sliding_window"]);
}

#[test]
fn internlm_v1_refuses_settings_its_code_ignores() {
    let base = fixture_config("internlm");
    let s = resolve(&base).unwrap();
    assert!(s.tensors.param(Role::O).unwrap().bias && s.tensors.param(Role::Q).unwrap().bias);
    assert!(!s.tensors.param(Role::Gate).unwrap().bias);
    assert!(
        !resolve(&with(&base, json!({"bias": false})))
            .unwrap()
            .tensors
            .param(Role::O)
            .unwrap()
            .bias
    );
    refused(&base, json!({"rope_theta": 1e6}), &["rope_theta"]);
    refused(
        &base,
        json!({"num_key_value_heads": 2}),
        &["num_key_value_heads"],
    );
    refused(&base, json!({"pretraining_tp": 2}), &["pretraining_tp"]);
}

#[test]
fn baichuan_tells_its_two_position_schemes_apart() {
    let alibi = resolve(&fixture_config("baichuan2_13b")).unwrap();
    assert!(alibi.attention.alibi && alibi.lm_head_norm);
    assert_eq!(alibi.max_position_embeddings, 32, "from model_max_length");
    assert_eq!(alibi.context_limit(), None);
    let rope = resolve(&fixture_config("baichuan2_7b")).unwrap();
    assert!(!rope.attention.alibi && rope.lm_head_norm);
    // Both codes grow their tables past the configured length.
    assert_eq!(rope.context_limit(), None);
    // ChatGLM's does not: positions past `seq_length` fail in the original.
    assert_eq!(
        resolve(&fixture_config("chatglm3"))
            .unwrap()
            .context_limit(),
        Some(8192)
    );
    // Baichuan 1 (vocabulary 64000): a plain head.
    let v1 = resolve(&with(
        &fixture_config("baichuan2_13b"),
        json!({"vocab_size": 64000}),
    ))
    .unwrap();
    assert!(!v1.lm_head_norm);
    let base = fixture_config("baichuan2_13b");
    // BaichuanConfig's default length when the key is absent; 0 is refused by its name.
    let no_len = resolve(&with(&base, json!({"model_max_length": null}))).unwrap();
    assert_eq!(no_len.max_position_embeddings, 4096);
    refused(&base, json!({"model_max_length": 0}), &["model_max_length"]);
    refused(&base, json!({"rope_theta": 1e6}), &["rope_theta"]);
    refused(
        &base,
        json!({"tie_word_embeddings": true}),
        &["tie_word_embeddings"],
    );
    refused(
        &base,
        json!({"num_key_value_heads": 2}),
        &["num_key_value_heads"],
    );
}

/// The checkpoint's own modeling file, when present, decides Baichuan's position scheme over the
/// config's shape (the 7B file has `RotaryEmbedding`, the 13B's `_get_interleave`).
#[test]
fn baichuan_reads_its_scheme_from_its_modeling_file_when_there_is_one() {
    for (case, code, alibi) in [
        (
            "baichuan2_13b",
            "class RotaryEmbedding(torch.nn.Module):\n",
            false,
        ),
        ("baichuan2_7b", "def _get_interleave(n):\n", true),
        // Unclear (neither or both): the config decides.
        ("baichuan2_7b", "# nothing\n", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(case);
        std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
        std::fs::write(dir.path().join("modeling_baichuan.py"), code).unwrap();
        let s = rabbit_models::load_spec(dir.path()).unwrap();
        assert_eq!(s.attention.alibi, alibi, "{case} with {code:?}");
    }
}

#[test]
fn alibi_slopes_are_baichuans() {
    // 8 heads: 2^(-8/8 · (i+1)).
    let s8 = alibi_slopes(8);
    for (i, s) in s8.iter().enumerate() {
        assert!((s - 2f64.powi(-(i as i32 + 1))).abs() < 1e-15);
    }
    // 6 heads: the 4-head slopes, then every other one of the 8-head list (as the original,
    // not sorted); the fixture's expected.json records the original's.
    let want = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
    assert_eq!(alibi_slopes(6), want);
    assert_eq!(alibi_slopes(40).len(), 40);
}

#[test]
fn qwen_v1_reads_seq_length_ntk_and_logn() {
    let base = fixture_config("qwen");
    let s = resolve(&base).unwrap();
    assert_eq!(s.rope.scaling, RopeScaling::QwenNtk { seq_length: 16 });
    assert_eq!(s.attention.logn_length, Some(16));
    assert_eq!(s.intermediate_size, 128, "w1 and w2 each get half");
    assert_eq!(s.max_position_embeddings, 32768);
    assert_eq!(s.norm.eps, 1e-6);
    let qkv = s.tensors.param(Role::Qkv).unwrap();
    assert!(qkv.bias && !s.tensors.param(Role::O).unwrap().bias);
    let plain = resolve(&with(
        &base,
        json!({"use_dynamic_ntk": false, "use_logn_attn": false}),
    ))
    .unwrap();
    assert_eq!(
        (plain.rope.scaling, plain.attention.logn_length),
        (RopeScaling::Default, None)
    );
    refused(&base, json!({"seq_length": null}), &["seq_length"]);
    refused(
        &base,
        json!({"use_cache_quantization": true}),
        &["use_cache_quantization"],
    );
    refused(
        &base,
        json!({"intermediate_size": 255}),
        &["intermediate_size"],
    );
    refused(
        &base,
        json!({"kv_channels": 8}),
        &["kv_channels", "hidden_size"],
    );
    refused(
        &base,
        json!({"kv_channels": 16, "head_dim": 8}),
        &["kv_channels", "head_dim"],
    );
    refused(&base, json!({"n_embd": 64}), &["n_embd"]);
    // Keys its code never reads would be silently ignored by the original.
    refused(
        &base,
        json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
        &["rope_scaling"],
    );
    refused(&base, json!({"hidden_act": "gelu"}), &["hidden_act"]);
    refused(
        &base,
        json!({"bf16": true, "fp32": true}),
        &["bf16", "fp32"],
    );
    // Its precision flags give the storage dtype when config.json names none.
    let bf = resolve(&with(&base, json!({"fp32": false, "bf16": true}))).unwrap();
    assert_eq!(bf.storage_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn qwen_ntk_alpha_follows_the_original_formula() {
    use rabbit_models::rope::qwen_ntk_alpha;
    // The original's get_ntk_alpha: at or below seq_length alpha 1; 2^ceil(log2(L/S)+1) - 1.
    assert_eq!(qwen_ntk_alpha(10, 16), 1.0);
    assert_eq!(qwen_ntk_alpha(16, 16), 1.0);
    assert_eq!(qwen_ntk_alpha(17, 16), 3.0);
    assert_eq!(qwen_ntk_alpha(32, 16), 3.0);
    assert_eq!(qwen_ntk_alpha(40, 16), 7.0);
    assert_eq!(qwen_ntk_alpha(10000, 8192), 3.0);
    assert_eq!(qwen_ntk_alpha(20000, 8192), 7.0);
}
