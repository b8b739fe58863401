//! Mixtures of experts against transformers (`tests/fixtures/make_moe_fixtures.py`): Mixtral,
//! Qwen2-MoE (shared expert with its sigmoid gate, a dense `mlp_only_layers` layer),
//! Qwen3-MoE (q/k norms, `decoder_sparse_step` 2, renormalised top-k), DeepSeek-V2 (latent
//! attention without a query latent, yarn mscale, group-limited softmax routing) and
//! DeepSeek-V3 (query latent, `rope_interleave`, `noaux_tc` with its correction bias). f32 logits within 1e-4
//! at every prompt position and along 32 greedy steps, identical tokens, and a left-padded
//! batch equal to each prompt alone; every layer streamed (only the routed experts read) and,
//! separately, every layer resident, bit for bit the same.

mod common;

use common::*;
use rabbitllm::{DType, DeviceSpec, ExpertCacheSize, LoadOptions, SamplingParams};

/// Greedy tokens and logits with every layer resident equal those of every streamed setting
/// exactly: experts read after routing with the cache off or holding all of them, and whole
/// layers read as dense ones are. Also checks what the profile says was read.
fn check_resident_equals_streamed(name: &str) {
    let case = Case::load(name);
    let seqs = case.sequences();
    let input: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
    let run = |resident: usize, cache: ExpertCacheSize, by_expert: bool| {
        let split = tempfile::tempdir().unwrap();
        let mut model = rabbitllm::AutoModel::from_pretrained(
            case.dir.to_str().unwrap(),
            LoadOptions::default()
                .device(DeviceSpec::Cpu)
                .dtype(DType::F32)
                .split_dir(split.path())
                .resident_layers(resident)
                .expert_cache(cache)
                .expert_streaming(by_expert),
        )
        .unwrap();
        let out = greedy(&mut model, input.clone(), 8, SamplingParams::default());
        (
            out,
            model.engine.profile.clone(),
            model.engine.expert_cache(),
        )
    };
    let (resident, p, c) = run(usize::MAX, ExpertCacheSize::Auto, true);
    assert_eq!(
        p.expert_loads, 0,
        "{name}: resident layers hold their experts"
    );
    assert!(c.is_none());
    let spec = rabbitllm::models::load_spec(&case.dir).unwrap();
    let sparse = (0..spec.num_layers).filter(|&i| spec.is_sparse(i)).count();
    let experts = spec.moe.as_ref().unwrap().num_experts;
    for (cache, by_expert) in [
        (ExpertCacheSize::Bytes(0), true),
        (ExpertCacheSize::Auto, true),
        (ExpertCacheSize::Bytes(0), false),
    ] {
        let (streamed, p, c) = run(0, cache, by_expert);
        for (a, b) in streamed.sequences.iter().zip(&resident.sequences) {
            assert_eq!(
                a.output_ids, b.output_ids,
                "{name} {cache:?} {by_expert}: tokens"
            );
            assert_eq!(
                a.logits, b.logits,
                "{name} {cache:?} {by_expert}: logits must be bit-identical"
            );
        }
        if !by_expert {
            assert_eq!(p.expert_loads, 0);
            assert!(c.is_none());
            continue;
        }
        let (budget, used, total) = c.expect("sparse layers stream by expert");
        assert!(p.expert_loads > 0 && sparse > 0);
        assert!(p.expert_bytes <= p.bytes_streamed);
        match cache {
            ExpertCacheSize::Bytes(0) => {
                assert_eq!(
                    (budget, used, p.expert_hits),
                    (0, 0, 0),
                    "{name}: cache off"
                );
            }
            _ => {
                // Tiny models fit: every expert is read once, then always found.
                assert_eq!(budget, total);
                assert!(
                    p.expert_hits > 0 && p.expert_bytes <= total,
                    "{name}: {p:?}"
                );
                let misses = (p.expert_loads - p.expert_hits) as usize;
                assert!(
                    misses <= sparse * experts,
                    "{name}: each expert read once at most"
                );
            }
        }
    }
}

fn check_moe(name: &str) {
    check_f32(name);
    check_batch(name);
    check_resident_equals_streamed(name);
}

#[test]
fn mixtral_matches_transformers() {
    check_moe("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_moe("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_moe("qwen3_moe");
}

#[test]
fn deepseek_v2_matches_transformers() {
    check_moe("deepseek_v2");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_moe("deepseek_v3");
}

/// DeepSeek-V3 as released: FP8 weights with their block scales, read as stored (in place, and
/// split: every setting reads the same bytes) and dequantized after reading, against
/// transformers' dequantisation of the same bytes.
#[test]
fn deepseek_v3_fp8_matches_transformers() {
    check_moe("deepseek_v3_fp8");
    let spec = rabbitllm::models::load_spec(&Case::load("deepseek_v3_fp8").dir).unwrap();
    assert_eq!(spec.fp8_block, Some([8, 8]));
}

/// A fixture with one tensor left out (any dtype).
fn without(name: &str, drop: &str) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let case = Case::load(name);
    let bytes = std::fs::read(case.dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor(drop).is_ok(), "{drop}");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(case.dir.join(f), dir.path().join(f)).unwrap();
    }
    let kept: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .map(|(n, t)| {
            (
                n,
                TensorView::new(t.dtype(), t.shape().to_vec(), t.data()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

/// Pre-quantised tensors without their scales are refused by name: an FP8 weight without its
/// `_scale_inv`, MXFP4 blocks without their exponents.
#[test]
fn prequantised_tensors_need_their_scales() {
    let weight = "model.layers.1.mlp.experts.3.up_proj.weight";
    let dir = without("deepseek_v3_fp8", &format!("{weight}_scale_inv"));
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(
            e.contains(weight) && e.contains("scale"),
            "split {split}: {e}"
        );
    }
    let scales = "model.layers.1.mlp.experts.down_proj_scales";
    let dir = without("gpt_oss_mxfp4", scales);
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(e.contains(scales), "split {split}: {e}");
    }
}

/// gpt-oss: sinks, alternating windows shorter than the prompts (a padded batch too), the
/// stacked experts read one row each.
#[test]
fn gpt_oss_matches_transformers() {
    check_moe("gpt_oss");
    check_window("gpt_oss");
}

/// gpt-oss as released: MXFP4 experts read as stored, one expert's blocks and exponents per
/// read, against transformers' dequantisation of the same bytes.
#[test]
fn gpt_oss_mxfp4_matches_transformers() {
    check_moe("gpt_oss_mxfp4");
    let spec = rabbitllm::models::load_spec(&Case::load("gpt_oss_mxfp4").dir).unwrap();
    assert!(spec.mxfp4 && spec.notes.iter().any(|n| n.contains("MXFP4")));
}

/// FP8 is refused for a family whose fused rows the split regroups (their block scales would
/// not follow), naming the config field.
#[test]
fn fp8_is_refused_where_rows_are_regrouped() {
    let case = Case::load("internlm2");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.dir.join("config.json")).unwrap())
            .unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3",
        "activation_scheme": "dynamic", "weight_block_size": [128, 128]});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = rabbitllm::models::load_spec(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("quantization_config") && e.contains("fp8"),
        "{e}"
    );
}

/// A stacked expert tensor of the wrong expert count, or missing, is refused by name.
#[test]
fn bad_stacked_experts_are_refused_by_name() {
    let stacked = "model.layers.1.mlp.experts.down_proj";
    let dir = edited_case("gpt_oss", &|t| {
        let (s, v) = t.get_mut(stacked).unwrap();
        s[0] = 7;
        v.truncate(7 * 16 * 32);
    });
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(
            e.contains(stacked) && e.contains("[8, 16, 32]"),
            "split {split}: {e}"
        );
    }
    let dir = edited_case("gpt_oss", &|t| {
        t.remove(stacked);
    });
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(e.contains(stacked), "split {split}: {e}");
    }
}

/// The latent cache holds `kv_lora_rank + qk_rope_head_dim` values per token and layer, not
/// every head's keys and values.
#[test]
fn latent_attention_caches_the_latent() {
    for (name, values, expanded) in [
        ("deepseek_v2", 16 + 4, 2 * 4 * 12),
        ("deepseek_v3", 16 + 8, 2 * 4 * 16),
    ] {
        let spec = rabbitllm::models::load_spec(&Case::load(name).dir).unwrap();
        assert_eq!(spec.kv_values_per_token(), values, "{name}");
        assert!(values < expanded);
    }
}

/// Streamed in place (no split: the experts are ranges of the original shard) and from
/// compressed splits (NF4, int8: each expert's codes and scales read together), reading by
/// expert gives exactly what reading whole layers gives.
#[test]
fn expert_streaming_in_place_and_compressed_equals_whole_layers() {
    use rabbitllm::split::Compression;
    let case = Case::load("qwen2_moe");
    let input: Vec<Vec<u32>> = case.sequences().into_iter().map(|s| s.0).collect();
    for compression in [None, Some(Compression::Nf4), Some(Compression::Int8)] {
        let run = |by_expert: bool| {
            let split = tempfile::tempdir().unwrap();
            let mut opts = LoadOptions::default()
                .device(DeviceSpec::Cpu)
                .dtype(DType::F32)
                .resident_layers(0)
                .expert_cache(ExpertCacheSize::Bytes(0))
                .expert_streaming(by_expert)
                .compression(compression);
            if compression.is_some() {
                opts = opts.split_dir(split.path());
            }
            let mut model =
                rabbitllm::AutoModel::from_pretrained(case.dir.to_str().unwrap(), opts).unwrap();
            assert_eq!(model.engine.streams_in_place(), compression.is_none());
            let out = greedy(&mut model, input.clone(), 6, SamplingParams::default());
            (out, model.engine.profile.clone())
        };
        let (whole, _) = run(false);
        let (experts, p) = run(true);
        assert!(p.expert_loads > 0);
        if compression.is_some() {
            assert!(
                p.packed_weights > 0,
                "compressed experts are applied as stored"
            );
        }
        for (a, b) in experts.sequences.iter().zip(&whole.sequences) {
            assert_eq!(a.output_ids, b.output_ids, "{compression:?}");
            assert_eq!(a.logits, b.logits, "{compression:?}: bit-identical");
        }
    }
}

/// A checkpoint's f32 tensors by name: shape and values.
type Tensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The qwen2_moe fixture rewritten: `edit` changes its tensors.
fn edited(edit: &dyn Fn(&mut Tensors)) -> tempfile::TempDir {
    edited_case("qwen2_moe", edit)
}

/// A fixture rewritten: `edit` changes its tensors.
fn edited_case(name: &str, edit: &dyn Fn(&mut Tensors)) -> tempfile::TempDir {
    use safetensors::tensor::{Dtype, TensorView};
    let case = Case::load(name);
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(case.dir.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(case.dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in st.tensors() {
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        tensors.insert(name, (t.shape().to_vec(), v));
    }
    edit(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &std::path::Path, split: bool) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = LoadOptions::default()
        .device(DeviceSpec::Cpu)
        .dtype(DType::F32)
        .resident_layers(0);
    if split {
        opts = opts.split_dir(tmp.path());
    }
    match rabbitllm::AutoModel::from_pretrained(dir.to_str().unwrap(), opts) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Bad checkpoints are refused at load, by tensor name, in place and when splitting: an
/// expert missing, a router of the wrong width, an expert config.json does not know.
#[test]
fn bad_mixture_checkpoints_are_refused_by_name() {
    let missing = "model.layers.2.mlp.experts.5.up_proj.weight";
    let dir = edited(&|t| {
        t.remove(missing);
    });
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(e.contains(missing), "split {split}: {e}");
    }
    let router = "model.layers.0.mlp.gate.weight";
    let dir = edited(&|t| {
        let (s, v) = t.get_mut(router).unwrap();
        s[0] = 7;
        v.truncate(7 * 32);
    });
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(
            e.contains(router) && e.contains("[7, 32]"),
            "split {split}: {e}"
        );
    }
    let extra = "model.layers.0.mlp.experts.8.up_proj.weight";
    let dir = edited(&|t| {
        let up = t["model.layers.0.mlp.experts.0.up_proj.weight"].clone();
        t.insert(extra.into(), up);
    });
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(e.contains(extra), "split {split}: {e}");
    }
}

/// DeepSeek-V3 checkpoints: a missing correction bias is refused by name; the
/// multi-token-prediction layer the hub's checkpoints carry past the last layer is left out,
/// and said so.
#[test]
fn deepseek_v3_checkpoints_are_checked_by_name() {
    let bias = "model.layers.2.mlp.gate.e_score_correction_bias";
    let dir = edited_case("deepseek_v3", &|t| {
        t.remove(bias);
    });
    for split in [false, true] {
        let e = load_err(dir.path(), split);
        assert!(e.contains(bias), "split {split}: {e}");
    }
    let dir = edited_case("deepseek_v3", &|t| {
        let w = t["model.layers.0.mlp.gate_proj.weight"].clone();
        t.insert("model.layers.3.eh_proj.weight".into(), w.clone());
        t.insert("model.layers.3.mlp.experts.0.gate_proj.weight".into(), w);
    });
    let spec = rabbitllm::models::load_spec(dir.path()).unwrap();
    assert!(
        spec.notes.iter().any(|n| n.contains("model.layers.3")),
        "{:?}",
        spec.notes
    );
    let case = Case::load("deepseek_v3");
    let input: Vec<Vec<u32>> = case.sequences().into_iter().map(|s| s.0).collect();
    let run = |dir: &std::path::Path| {
        let split = tempfile::tempdir().unwrap();
        let opts = LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::F32)
            .split_dir(split.path())
            .resident_layers(0);
        let mut m = rabbitllm::AutoModel::from_pretrained(dir.to_str().unwrap(), opts).unwrap();
        greedy(&mut m, input.clone(), 4, SamplingParams::default())
    };
    let (with_mtp, plain) = (run(dir.path()), run(&case.dir));
    for (a, b) in with_mtp.sequences.iter().zip(&plain.sequences) {
        assert_eq!(a.logits, b.logits);
    }
}

/// Guessing experts a layer early changes nothing in the numbers, from an NF4 split too (its
/// routers stored exact), and the guesses are scored.
#[test]
fn expert_guess_changes_nothing_and_runs_on_compressed_splits() {
    use rabbitllm::split::Compression;
    let case = Case::load("qwen3_moe");
    let input: Vec<Vec<u32>> = case.sequences().into_iter().map(|s| s.0).collect();
    for compression in [None, Some(Compression::Nf4)] {
        let run = |guess: bool| {
            let split = tempfile::tempdir().unwrap();
            let opts = LoadOptions::default()
                .device(DeviceSpec::Cpu)
                .dtype(DType::F32)
                .resident_layers(0)
                .expert_cache(ExpertCacheSize::Bytes(0))
                .expert_guess(guess)
                .compression(compression)
                .split_dir(split.path());
            let mut model =
                rabbitllm::AutoModel::from_pretrained(case.dir.to_str().unwrap(), opts).unwrap();
            let out = greedy(&mut model, input.clone(), 6, SamplingParams::default());
            (out, model.engine.profile.clone())
        };
        let (plain, _) = run(false);
        let (guessed, p) = run(true);
        // Layers 1 and 3 are sparse: layer 3 is guessed from layer 2's input.
        assert!(p.expert_guesses > 0 && p.expert_guess_hits <= p.expert_guesses);
        for (a, b) in guessed.sequences.iter().zip(&plain.sequences) {
            assert_eq!(a.output_ids, b.output_ids, "{compression:?}");
            assert_eq!(a.logits, b.logits, "{compression:?}");
        }
    }
}

/// Under a budget too small for the layers, the planner keeps the sparse layers' dense parts
/// resident first; those layers then read only their routed experts, with the same numbers.
#[test]
fn dense_parts_stay_resident_under_a_budget() {
    let case = Case::load("qwen3_moe");
    let input: Vec<Vec<u32>> = case.sequences().into_iter().map(|s| s.0).collect();
    let open = |budget: Option<u64>| {
        let split = tempfile::tempdir().unwrap();
        let mut opts = LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::F32)
            .split_dir(split.path())
            .plan_for(1, 64);
        opts = match budget {
            Some(b) => opts.device_memory_budget(b),
            None => opts.resident_layers(usize::MAX),
        };
        rabbitllm::AutoModel::from_pretrained(case.dir.to_str().unwrap(), opts).ok()
    };
    let mut found = None;
    for kib in (100..800).step_by(4) {
        if let Some(m) = open(Some(kib << 10)) {
            let p = m.engine.plan();
            if !p.dense_resident_layers.is_empty() {
                found = Some(m);
                break;
            }
        }
    }
    let mut model = found.expect("a budget where only the dense parts fit");
    let plan = model.engine.plan().clone();
    assert_eq!(plan.dense_resident_layers, vec![1, 3], "the sparse layers");
    let got = greedy(&mut model, input.clone(), 6, SamplingParams::default());
    let p = &model.engine.profile;
    assert!(p.expert_loads > 0);
    for &i in &plan.dense_resident_layers {
        assert!(
            p.layers[i].resident && p.layers[i].expert_loads > 0,
            "layer {i}"
        );
    }
    let mut resident = open(None).unwrap();
    let want = greedy(&mut resident, input, 6, SamplingParams::default());
    for (a, b) in got.sequences.iter().zip(&want.sequences) {
        assert_eq!(a.output_ids, b.output_ids);
        assert_eq!(a.logits, b.logits);
    }
}
