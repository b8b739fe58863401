//! Config resolution of the families beyond the Llama lineage, on the config.json files
//! transformers 5.23 wrote for the parity fixtures (`tests/fixtures/*` at the workspace root):
//! what each resolves to, and every unknown or contradictory field refused by name.

use std::path::Path;

use rabbit_models::{
    spec_from_config, Activation, HfConfig, LayerProgram, ModelSpec, NormKind, Role, RopeScaling,
};
use serde_json::{json, Value};

fn fixture_config(case: &str, file: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(case)
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn resolve(cfg: &Value) -> Result<ModelSpec, String> {
    let parsed = HfConfig::from_json_str(&cfg.to_string())?;
    spec_from_config(&parsed, None).map_err(|e| e.to_string())
}

/// `base` with `patch` applied (`null` removes a key; nested objects are replaced whole).
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

#[test]
fn the_fixture_configs_resolve_to_their_blocks() {
    let g2 = resolve(&fixture_config("gemma2", "config.json")).unwrap();
    let same = with(
        &fixture_config("gemma2", "config.json"),
        json!({"sliding_window_size": 6, "cache_implementation": "hybrid"}),
    );
    assert_eq!(resolve(&same).unwrap(), g2, "harmless Gemma 2 keys");
    assert_eq!(g2.norm.kind, NormKind::RmsOffset);
    assert_eq!(g2.program, LayerProgram::Sandwich);
    assert_eq!(g2.activation, Activation::GeluTanh);
    assert_eq!(g2.attention.softcap, Some(3.0));
    assert_eq!(g2.final_logit_softcap, Some(5.0));
    assert!((g2.attention.scale - 24f64.powf(-0.5)).abs() < 1e-12);
    assert_eq!(g2.embed_scale, Some(48f64.sqrt()));
    assert_eq!(g2.sliding_windows, vec![Some(6), None, Some(6), None]);

    let g3 = resolve(&fixture_config("gemma3", "config.json")).unwrap();
    assert!(g3.has(Role::QNorm) && g3.has(Role::KNorm));
    assert_eq!(g3.rope.theta, 1e6);
    assert!(matches!(g3.rope.scaling, RopeScaling::Linear { factor } if factor == 8.0));
    let local = g3.local_rope.as_ref().unwrap();
    assert_eq!((local.theta, &local.scaling), (1e4, &RopeScaling::Default));
    let alt = resolve(&fixture_config("gemma3", "config.alt.json")).unwrap();
    assert_eq!(alt.rope, g3.rope);
    assert_eq!(alt.local_rope, g3.local_rope);
    assert_eq!(alt.sliding_windows, g3.sliding_windows);

    let cg = resolve(&fixture_config("gemma3_cg", "config.json")).unwrap();
    assert_eq!(cg.architecture, "Gemma3ForConditionalGeneration");
    assert!(!cg.tensors.aliases.is_empty() && !cg.tensors.ignored_prefixes.is_empty());

    let p3 = resolve(&fixture_config("phi3_longrope", "config.json")).unwrap();
    assert!(p3.has(Role::Qkv) && p3.has(Role::GateUp) && !p3.has(Role::Q));
    assert_eq!(p3.rope.dim, 12);
    assert!(matches!(
        p3.rope.scaling,
        RopeScaling::LongRope {
            original_max_position_embeddings: 16,
            ..
        }
    ));

    let p2 = resolve(&fixture_config("phi2", "config.json")).unwrap();
    assert_eq!(p2.norm.kind, NormKind::Layer);
    assert_eq!(p2.program, LayerProgram::Parallel);
    assert_eq!(p2.activation, Activation::GeluNew);
    assert_eq!(p2.rope.dim, 6);
    assert!(p2.tensors.lm_head_bias && p2.tensors.final_norm_bias);

    for case in ["glm", "glm4"] {
        let g = resolve(&fixture_config(case, "config.json")).unwrap();
        assert!(g.rope.interleaved && g.rope.dim == g.head_dim / 2, "{case}");
        assert!(g.tensors.param(Role::Q).unwrap().bias);
        assert!(!g.tensors.param(Role::O).unwrap().bias);
    }
    let g4 = resolve(&fixture_config("glm4", "config.json")).unwrap();
    assert_eq!(g4.program, LayerProgram::Sandwich);
}

/// A key no family code reads is refused by name, in every family.
#[test]
fn unknown_fields_are_refused_by_name() {
    for case in [
        "gemma2",
        "gemma3",
        "gemma3_cg",
        "phi3_longrope",
        "phi3_window",
        "phi2",
        "glm4",
        "glm",
    ] {
        let base = fixture_config(case, "config.json");
        let e = resolve(&with(&base, json!({"attention_sink_size": 4}))).unwrap_err();
        assert!(e.contains("`attention_sink_size`"), "{case}: {e}");
    }
}

/// Values the families cannot run, or that contradict each other, are refused naming the
/// fields.
#[test]
fn unsupported_and_contradictory_fields_are_refused_by_name() {
    let g2 = fixture_config("gemma2", "config.json");
    let g3 = fixture_config("gemma3", "config.json");
    let g3alt = fixture_config("gemma3", "config.alt.json");
    let cg = fixture_config("gemma3_cg", "config.json");
    let p3 = fixture_config("phi3_longrope", "config.json");
    let p2 = fixture_config("phi2", "config.json");
    let glm = fixture_config("glm", "config.json");
    let mut cg_eos = cg.clone();
    cg_eos["eos_token_id"] = json!(7);
    let mut nested_local = g3.clone();
    nested_local["rope_local_base_freq"] = json!(500.0);
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "gemma2",
            with(&g2, json!({"hidden_activation": "quick_gelu"})),
            vec!["hidden_activation"],
        ),
        (
            "gemma2",
            with(&g2, json!({"attn_logit_softcapping": 0.0})),
            vec!["attn_logit_softcapping"],
        ),
        (
            "gemma2",
            with(&g2, json!({"use_bidirectional_attention": true})),
            vec!["use_bidirectional_attention"],
        ),
        (
            "gemma2",
            with(&g2, json!({"query_pre_attn_scalar": "x"})),
            vec!["query_pre_attn_scalar"],
        ),
        (
            "gemma3",
            nested_local,
            vec!["rope_local_base_freq", "rope_parameters.sliding_attention"],
        ),
        (
            "gemma3",
            with(
                &g3alt,
                json!({"sliding_window_pattern": 6, "_sliding_window_pattern": 4}),
            ),
            vec!["_sliding_window_pattern", "sliding_window_pattern"],
        ),
        (
            "gemma3",
            with(
                &g3,
                json!({"rope_parameters": {"full_attention": {"rope_type": "default"}, "chunked_attention": {}}}),
            ),
            vec!["rope_parameters.chunked_attention"],
        ),
        (
            "gemma3",
            with(&g3, json!({"model_type": "gemma3"})),
            vec!["model_type"],
        ),
        (
            "gemma3_cg",
            cg_eos,
            vec!["eos_token_id", "text_config.eos_token_id"],
        ),
        (
            "phi3",
            with(&p3, json!({"attention_bias": true})),
            vec!["attention_bias"],
        ),
        (
            "phi3",
            with(&p3, json!({"partial_rotary_factor": 0.5})),
            vec!["partial_rotary_factor"],
        ),
        (
            "phi",
            with(&p2, json!({"qk_layernorm": true, "head_dim": 10})),
            vec!["qk_layernorm", "head_dim"],
        ),
        (
            "phi",
            with(&p2, json!({"rms_norm_eps": 1e-5})),
            vec!["rms_norm_eps", "layer_norm_eps"],
        ),
        (
            "phi",
            with(&p2, json!({"hidden_act": "quick_gelu"})),
            vec!["hidden_act"],
        ),
        (
            "glm",
            with(&glm, json!({"sliding_window": 8})),
            vec!["sliding_window"],
        ),
        (
            "glm",
            with(&glm, json!({"partial_rotary_factor": 0.3})),
            vec!["partial_rotary_factor"],
        ),
    ];
    for (family, cfg, fields) in cases {
        let e = match resolve(&cfg) {
            Ok(spec) => panic!("{family}: accepted as {spec:?}"),
            Err(e) => e,
        };
        for f in fields {
            assert!(e.contains(f), "{family}: does not name {f}: {e}");
        }
    }
}

/// gemma-3-4b-it's config.json as the hub ships it: the text config gives only what differs from
/// transformers' `Gemma3TextConfig` defaults, which fill the rest.
#[test]
fn a_hub_gemma3_multimodal_config_resolves_with_the_text_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255_999,
        "eoi_token_index": 256_000,
        "eos_token_id": [1, 106],
        "image_token_index": 262_144,
        "initializer_range": 0.02,
        "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false}
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let spec = rabbit_models::load_spec(dir.path()).unwrap();
    assert_eq!(spec.architecture, "Gemma3ForConditionalGeneration");
    assert_eq!((spec.hidden_size, spec.num_layers), (2560, 34));
    assert_eq!(
        (spec.num_heads, spec.num_kv_heads, spec.head_dim),
        (8, 4, 256)
    );
    assert_eq!(spec.vocab_size, 262_208);
    assert!(spec.tie_word_embeddings);
    assert_eq!(spec.eos_token_ids, vec![1, 106]);
    let windowed = spec.sliding_windows.iter().filter(|w| w.is_some()).count();
    assert_eq!(windowed, 34 - 34 / 6, "5 local layers per global one");
    assert_eq!(spec.sliding_windows[5], None);
    assert_eq!(spec.sliding_windows[0], Some(1024));
    assert!(matches!(spec.rope.scaling, RopeScaling::Linear { factor } if factor == 8.0));
    assert_eq!(spec.local_rope.as_ref().unwrap().theta, 10_000.0);
    assert!((spec.attention.scale - 1.0 / 16.0).abs() < 1e-12);
    assert_eq!(spec.final_logit_softcap, None);
}

/// A multimodal config in transformers 5's layout whose text rope settings and layer pattern
/// differ from `Gemma3TextConfig`'s defaults resolves to them (the defaults only fill what is
/// missing, never contradict what is there).
#[test]
fn a_gemma3_multimodal_config_keeps_its_own_rope_and_pattern() {
    let mut cfg = fixture_config("gemma3_cg", "config.json");
    let text = cfg["text_config"].as_object_mut().unwrap();
    text.insert(
        "rope_parameters".into(),
        json!({"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}),
    );
    text.remove("rope_theta");
    text.remove("rope_local_base_freq");
    text.remove("rope_scaling");
    text.insert("_sliding_window_pattern".into(), json!(2));
    text.remove("sliding_window_pattern");
    text.remove("layer_types");
    text.remove("sliding_window");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let spec = rabbit_models::load_spec(dir.path()).unwrap();
    assert_eq!(spec.rope.theta, 500000.0);
    assert!(matches!(spec.rope.scaling, RopeScaling::Linear { factor } if factor == 2.0));
    assert_eq!(spec.local_rope.as_ref().unwrap().theta, 20000.0);
    let n = spec.num_layers;
    let want: Vec<Option<usize>> = (0..n).map(|i| ((i + 1) % 2 != 0).then_some(4096)).collect();
    assert_eq!(
        spec.sliding_windows, want,
        "pattern 2, transformers' default window 4096"
    );
}

/// transformers' YaRN reads `truncate` from the top of `rope_parameters`, which per-layer-type
/// settings (Gemma 3) never have there: `truncate: false` inside `full_attention` is ignored.
#[test]
fn gemma3_yarn_truncate_is_read_where_transformers_reads_it() {
    let cfg = with(
        &fixture_config("gemma3", "config.json"),
        json!({"rope_parameters": {
            "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6,
                               "original_max_position_embeddings": 8, "truncate": false},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    );
    let spec = resolve(&cfg).unwrap();
    assert!(
        matches!(spec.rope.scaling, RopeScaling::Yarn { truncate: true, .. }),
        "{:?}",
        spec.rope.scaling
    );
    let flat = with(
        &fixture_config("llama3_rope", "config.json"),
        json!({"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 8, "truncate": false}}),
    );
    let spec = resolve(&flat).unwrap();
    assert!(matches!(
        spec.rope.scaling,
        RopeScaling::Yarn {
            truncate: false,
            ..
        }
    ));
}
