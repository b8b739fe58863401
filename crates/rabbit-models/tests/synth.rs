//! Tests of `rabbit_models::synth`: the presets (real parameter counts, every family, overrides)
//! and the validation of options. The files of a checkpoint, determinism, reuse and the tokenizer
//! are in `synth_checkpoint.rs`; the weights, a reference forward pass and bounded memory while
//! streaming in `synth_weights.rs`.

mod common;

use std::path::Path;

use common::{opts, ARCHES, NO_GQA};
use rabbit_models::synth::{
    self, plan, presets, synthesize, SynthDtype, SynthError, SynthOptions, SynthOverrides,
};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Presets and validation

#[test]
fn presets_resolve_with_the_real_parameter_counts() {
    // Published parameter counts of the real models (tied embeddings counted once).
    let cases: &[(&str, &str, u64)] = &[
        ("qwen2", "qwen2.5-0.5b", 494_032_768),
        ("qwen2", "qwen2.5-1.5b", 1_543_714_304),
        ("qwen2", "qwen2.5-3b", 3_085_938_688),
        ("qwen2", "qwen2.5-7b", 7_615_616_512),
        ("qwen3", "qwen3-0.6b", 596_049_920),
        ("qwen3", "qwen3-1.7b", 1_720_574_976),
        ("llama", "llama3.2-1b", 1_235_814_400),
        ("mistral", "mistral-7b", 7_241_732_096),
        ("gemma2", "gemma2-2b", 2_614_341_888),
        ("gemma3", "gemma3-1b", 999_885_952),
        ("phi3", "phi3-mini", 3_821_079_552),
        ("phi", "phi-2", 2_779_683_840),
    ];
    let dir = Path::new("/nonexistent/never-written");
    for &(arch, preset, params) in cases {
        let p = plan(&opts(arch, preset, dir)).unwrap_or_else(|e| panic!("{preset}: {e}"));
        let rel = (p.num_parameters as f64 - params as f64).abs() / params as f64;
        assert!(
            rel < 0.01,
            "{preset}: {} params, expected ~{params}",
            p.num_parameters
        );
        assert_eq!(p.num_parameters, params, "{preset}");
        assert_eq!(p.weight_bytes, params * 2, "{preset}: bf16 bytes");
        assert_eq!(p.spec.num_parameters(), params);
        assert!(p.spec.vocab_size >= p.tokenizer_size);
    }
    assert!(!dir.exists());
    // Published counts, rounded: DeepSeek-V3 671B (its MTP layer not counted), V2-Lite 15.7B.
    for (arch, preset, params) in [
        ("deepseek_v3", "deepseek-v3", 671e9),
        ("deepseek_v2", "deepseek-v2-lite", 15.7e9),
        // openai's model card: 20.9B and 116.8B.
        ("gpt_oss", "gpt-oss-20b", 20.9e9),
        ("gpt_oss", "gpt-oss-120b", 116.8e9),
    ] {
        let p = plan(&opts(arch, preset, dir)).unwrap_or_else(|e| panic!("{preset}: {e}"));
        let rel = (p.num_parameters as f64 - params).abs() / params;
        assert!(rel < 0.005, "{preset}: {} params", p.num_parameters);
    }

    let q3 = plan(&opts("qwen3", "qwen3-0.6b", dir)).unwrap();
    assert_eq!(q3.spec.head_dim, 128);
    assert!(q3.spec.has(rabbit_models::Role::QNorm) && q3.spec.tie_word_embeddings);
    assert_eq!(q3.config_json["head_dim"], 128);
    assert_eq!(q3.config_json["max_position_embeddings"], 40960);
    assert_eq!(q3.config_json["sliding_window"], Value::Null);
    assert_eq!(q3.config_json["use_sliding_window"], false);

    let q7 = plan(&opts("Qwen2ForCausalLM", "qwen2.5-7b", dir)).unwrap();
    assert!(
        !q7.spec.tie_word_embeddings && q7.spec.tensors.param(rabbit_models::Role::Q).unwrap().bias
    );
    assert_eq!(q7.spec.vocab_size, 152_064);
    assert_eq!(q7.spec.tensor_shapes().last().unwrap().0, "lm_head.weight");

    let l = plan(&opts("llama", "llama3.2-1b", dir)).unwrap();
    assert_eq!(l.config_json["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(l.config_json["rope_scaling"]["factor"], 32.0);
    assert_eq!(l.config_json["rope_theta"], 500_000.0);
    assert_eq!(l.config_json["rms_norm_eps"], 1e-5);
    assert!(matches!(
        l.spec.rope.scaling,
        rabbit_models::RopeScaling::Llama3 { .. }
    ));

    let m = plan(&opts("mistral", "mistral-7b", dir)).unwrap();
    assert_eq!(m.spec.sliding_windows, vec![None; 32]);
    assert_eq!(m.spec.rope.theta, 1e6);
    assert_eq!(m.spec.vocab_size, 32_000);
}

#[test]
fn tiny_preset_works_for_every_family_and_overrides_apply() {
    let dir = Path::new("/nonexistent/never-written");
    for arch in ARCHES {
        let p = plan(&opts(arch, "tiny", dir)).unwrap();
        assert_eq!(p.spec.hidden_size, 64, "{arch}");
        let kv = if NO_GQA.contains(&arch) { 4 } else { 2 };
        assert_eq!(
            (p.spec.num_heads, p.spec.num_kv_heads, p.spec.head_dim),
            (4, kv, 16),
            "{arch}"
        );
        assert_eq!(p.spec.vocab_size % 64, 0);
        assert!(p.spec.vocab_size >= p.tokenizer_size && p.spec.vocab_size < p.tokenizer_size + 64);
        let untied = [
            "mistral",
            "phi3",
            "phi",
            "glm",
            "glm4",
            "chatglm",
            "internlm2",
            "internlm",
            "baichuan",
            "qwen1",
        ];
        assert_eq!(
            p.spec.tie_word_embeddings,
            !untied.contains(&arch),
            "{arch}"
        );
        assert!(presets(arch).unwrap().contains(&"tiny"));
    }
    let mut o = opts("qwen2", "qwen2.5-1.5b", dir);
    o.overrides = SynthOverrides {
        layers: Some(4),
        hidden: Some(256),
        intermediate: Some(512),
        heads: Some(8),
        kv_heads: Some(4),
        vocab: Some(4096),
        max_position: Some(4096),
        tie_word_embeddings: Some(false),
        rope_theta: Some(12345.0),
        head_dim: None,
        ..SynthOverrides::default()
    };
    let p = plan(&o).unwrap();
    let s = &p.spec;
    assert_eq!(
        (s.num_layers, s.hidden_size, s.intermediate_size),
        (4, 256, 512)
    );
    assert_eq!((s.num_heads, s.num_kv_heads, s.head_dim), (8, 4, 32));
    assert_eq!((s.vocab_size, s.max_position_embeddings), (4096, 4096));
    assert!(!s.tie_word_embeddings);
    assert_eq!(s.rope.theta, 12345.0);
    assert_eq!(p.config.max_window_layers, Some(4));

    // qwen3 keeps the preset's explicit head_dim; tiny derives it from the overridden width.
    let mut o = opts("qwen3", "qwen3-0.6b", dir);
    o.overrides.hidden = Some(512);
    assert_eq!(plan(&o).unwrap().spec.head_dim, 128);
    let mut o = opts("qwen3", "tiny", dir);
    o.overrides.hidden = Some(128);
    assert_eq!(plan(&o).unwrap().spec.head_dim, 32);

    // Families without grouped keys refuse an explicit other count rather than ignore it.
    for arch in NO_GQA {
        let mut o = opts(arch, "tiny", dir);
        o.overrides.kv_heads = Some(2);
        let e = plan(&o).unwrap_err().to_string();
        assert!(
            e.contains("--kv-heads") && e.contains("grouped"),
            "{arch}: {e}"
        );
    }

    let all = synth::all_presets();
    assert_eq!(all[0].name, "tiny");
    assert_eq!(all.len(), 28);
    assert_eq!(
        presets("Qwen3ForCausalLM").unwrap(),
        vec!["tiny", "qwen3-0.6b", "qwen3-1.7b"]
    );
}

#[test]
fn bad_options_are_clear_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let err = |o: &SynthOptions| {
        let e = synthesize(o, &mut |_| {}).unwrap_err();
        assert!(!dir.exists(), "nothing may be written for {e}");
        e
    };

    let e = err(&opts("gpt2", "tiny", &dir));
    assert!(matches!(e, SynthError::UnknownArch { .. }), "{e}");
    assert!(
        e.to_string().contains("gpt2") && e.to_string().contains("qwen3"),
        "{e}"
    );

    let e = err(&opts("qwen2", "qwen2.5-70b", &dir));
    assert!(matches!(e, SynthError::UnknownPreset { .. }), "{e}");
    assert!(
        e.to_string().contains("qwen2.5-0.5b") && e.to_string().contains("tiny"),
        "{e}"
    );

    let e = err(&opts("llama", "qwen3-0.6b", &dir));
    assert!(matches!(e, SynthError::PresetOfOtherArch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("qwen3") && msg.contains("llama3.2-1b"),
        "{msg}"
    );

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.vocab = Some(100);
    let e = err(&o);
    assert!(e.to_string().contains("--vocab"), "{e}");

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.heads = Some(3);
    o.overrides.kv_heads = Some(1);
    let e = err(&o);
    assert!(matches!(e, SynthError::InvalidConfig { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("--heads 3") && msg.contains("not divisible"),
        "{msg}"
    );

    let mut o = opts("qwen3", "tiny", &dir);
    o.overrides.heads = Some(3);
    o.overrides.kv_heads = Some(1);
    assert!(err(&o).to_string().contains("--head-dim"));

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.layers = Some(0);
    assert!(err(&o).to_string().contains("num_hidden_layers"));

    let mut o = opts("qwen2", "tiny", &dir);
    o.overrides.rope_theta = Some(-1.0);
    assert!(err(&o).to_string().contains("--rope-theta"));

    let mut o = opts("qwen2", "tiny", &dir);
    o.shards = 0;
    assert!(err(&o).to_string().contains("--shards"));
    o.shards = 1000;
    let e = err(&o);
    assert!(
        e.to_string().contains("--shards") && e.to_string().contains("tensors"),
        "{e}"
    );

    assert_eq!("BF16".parse::<SynthDtype>().unwrap(), SynthDtype::BF16);
    assert_eq!("f32".parse::<SynthDtype>().unwrap(), SynthDtype::F32);
    assert_eq!("float16".parse::<SynthDtype>().unwrap(), SynthDtype::F16);
    let e = "int8".parse::<SynthDtype>().unwrap_err();
    assert!(
        e.to_string().contains("int8") && e.to_string().contains("bf16"),
        "{e}"
    );
}
