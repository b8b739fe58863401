//! Split-time block-wise compression (NF4 / INT8): the quantizers against brute-force
//! references, and complete compressed splits (layout, sizes, untouched tensors, manifest,
//! staleness, crash resume, verify).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rabbit_split::{
    default_split_dir, default_split_dir_for, dequantize_int8, dequantize_nf4, is_current,
    quantize_int8, quantize_nf4, stale_reason, Compression, Dtype, Manifest, SplitEvent,
    SplitOptions, SplitOutcome, NF4_CODEBOOK, QUANT_BLOCK,
};
use serde::{Deserialize, Serialize};

/// Deterministic, roughly normal values with a few outliers and a zero block.
fn sample_values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut v: Vec<f32> = (0..n)
        .map(|i| {
            let g = next() + next() + next() + next();
            if i % 97 == 5 {
                g * 40.0
            } else {
                g * 0.02
            }
        })
        .collect();
    // One all-zero block (if long enough) and exact +-absmax values.
    if n >= 3 * QUANT_BLOCK {
        v[QUANT_BLOCK..2 * QUANT_BLOCK].fill(0.0);
    }
    v
}

#[allow(clippy::needless_range_loop)]
fn brute_nf4_code(v: f32) -> usize {
    let mut best = 0;
    for i in 1..16 {
        if (NF4_CODEBOOK[i] - v).abs() < (NF4_CODEBOOK[best] - v).abs() {
            best = i;
        }
    }
    best
}

#[test]
fn int8_round_trip_error_is_within_half_a_scale() {
    for n in [1usize, 63, 64, 65, 1000, 4096] {
        let x = sample_values(n, n as u64);
        let (mut q, mut s) = (Vec::new(), Vec::new());
        quantize_int8(&x, &mut q, &mut s);
        let blocks = n.div_ceil(QUANT_BLOCK);
        assert_eq!(s.len(), blocks);
        assert_eq!(q.len(), blocks * QUANT_BLOCK);
        assert!(q.iter().all(|&c| c >= -127), "-128 is never used");
        assert!(q[n..].iter().all(|&c| c == 0), "padding is 0");
        let back = dequantize_int8(&q, &s, n);
        for (i, (&a, &b)) in x.iter().zip(&back).enumerate() {
            let blk =
                &x[i / QUANT_BLOCK * QUANT_BLOCK..((i / QUANT_BLOCK + 1) * QUANT_BLOCK).min(n)];
            let absmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = s[i / QUANT_BLOCK];
            assert_eq!(scale, absmax / 127.0);
            let tol = scale / 2.0 * (1.0 + 1e-5) + f32::MIN_POSITIVE;
            assert!(
                (a - b).abs() <= tol,
                "n={n} i={i}: {a} -> {b}, scale {scale}"
            );
            assert_eq!(
                q[i] as f32,
                if scale == 0.0 {
                    0.0
                } else {
                    (a / scale).round()
                }
            );
        }
    }
    // Zero block -> scale 0, codes 0.
    let (mut q, mut s) = (Vec::new(), Vec::new());
    quantize_int8(&[0.0; 70], &mut q, &mut s);
    assert_eq!(s, [0.0, 0.0]);
    assert!(q.iter().all(|&c| c == 0));
}

#[test]
fn nf4_equals_the_nearest_codebook_value_times_absmax() {
    for n in [1usize, 2, 63, 64, 65, 1001, 4096] {
        let mut x = sample_values(n, 7 + n as u64);
        if n > 10 {
            // Exact extremes of a block map to +-1.
            x[3] = 1.5;
            x[4] = -1.5;
        }
        let (mut codes, mut absmax) = (Vec::new(), Vec::new());
        quantize_nf4(&x, &mut codes, &mut absmax);
        let blocks = n.div_ceil(QUANT_BLOCK);
        assert_eq!(absmax.len(), blocks);
        assert_eq!(codes.len(), blocks * QUANT_BLOCK / 2);
        let back = dequantize_nf4(&codes, &absmax, n);
        for i in 0..n {
            let b = i / QUANT_BLOCK;
            let blk = &x[b * QUANT_BLOCK..((b + 1) * QUANT_BLOCK).min(n)];
            let a = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(absmax[b], a, "absmax is exact, not double-quantized");
            let code = if a == 0.0 {
                7
            } else {
                brute_nf4_code(x[i] / a)
            };
            let got = (codes[i / 2] >> (4 * (i % 2))) & 0x0f;
            assert_eq!(got as usize, code, "n={n} i={i} x={}", x[i]);
            assert_eq!(back[i], NF4_CODEBOOK[code] * a, "n={n} i={i}");
        }
        // Padding of the last block is code 7 (0.0).
        for i in n..blocks * QUANT_BLOCK {
            assert_eq!((codes[i / 2] >> (4 * (i % 2))) & 0x0f, 7, "pad {i}");
        }
    }
}

#[test]
fn nf4_codes_pack_low_nibble_first() {
    // absmax 2: -2 -> code 0, 2 -> code 15, 0 -> 7, 0.16 -> 0.08 -> code 8.
    let x = [-2.0f32, 2.0, 0.0, 0.16, 2.0];
    let (mut codes, mut absmax) = (Vec::new(), Vec::new());
    quantize_nf4(&x, &mut codes, &mut absmax);
    assert_eq!(absmax, [2.0]);
    assert_eq!(codes.len(), 32);
    assert_eq!(
        codes[0], 0xF0,
        "element 0 in the low nibble, element 1 in the high"
    );
    assert_eq!(codes[1], 0x87);
    assert_eq!(codes[2], 0x7F, "element 4 = 15, padding 7");
    assert!(codes[3..].iter().all(|&b| b == 0x77));
    let (mut codes, mut absmax) = (Vec::new(), Vec::new());
    quantize_nf4(&[0.0; 3], &mut codes, &mut absmax);
    assert_eq!(absmax, [0.0]);
    assert!(codes.iter().all(|&b| b == 0x77));
}

#[test]
fn unknown_compression_is_a_clear_error() {
    let e = "q4_k".parse::<Compression>().unwrap_err().to_string();
    assert!(
        e.contains("q4_k") && e.contains("4bit") && e.contains("8bit"),
        "{e}"
    );
    assert_eq!("nf4".parse::<Compression>().unwrap(), Compression::Nf4);
    assert_eq!("8bit".parse::<Compression>().unwrap(), Compression::Int8);
}

#[test]
fn default_split_dir_depends_on_compression() {
    let ck = Path::new("/m");
    assert_eq!(default_split_dir_for(ck, None), default_split_dir(ck));
    assert_eq!(default_split_dir(ck), Path::new("/m/rabbit-split"));
    assert_eq!(
        default_split_dir_for(ck, Some(Compression::Nf4)),
        Path::new("/m/rabbit-split-4bit")
    );
    let opts = SplitOptions {
        compression: Some(Compression::Int8),
        ..SplitOptions::default()
    };
    assert_eq!(opts.split_dir(ck), Path::new("/m/rabbit-split-8bit"));
}

fn compressed(out: &Path, scheme: Compression, embeddings: bool) -> SplitOptions {
    SplitOptions {
        compression: Some(scheme),
        compress_embeddings: embeddings,
        ..opts_to(out)
    }
}

/// Source tensor values as f32.
fn source_f32(ckpt: &Path, name: &str) -> (Dtype, Vec<usize>, Vec<f32>) {
    let (d, shape, bytes) = source_tensor(ckpt, name);
    let v = match d {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => panic!("{d}"),
    };
    (d, shape, v)
}

/// The expected (codes bytes, scales bytes) of a source tensor.
fn expected_quant(scheme: Compression, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
    let (codes, scales) = match scheme {
        Compression::Nf4 => {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            quantize_nf4(x, &mut c, &mut s);
            (c, s)
        }
        Compression::Int8 => {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            quantize_int8(x, &mut c, &mut s);
            (c.into_iter().map(|b| b as u8).collect(), s)
        }
    };
    (codes, scales.iter().flat_map(|s| s.to_le_bytes()).collect())
}

/// Checks every unit file of a compressed split against the source and the manifest.
fn check_split(ckpt: &Path, out: &Path, scheme: Compression, embeddings: bool) -> Manifest {
    let m = Manifest::load(out).unwrap();
    assert_eq!(m.options.compression, Some(scheme));
    assert_eq!(m.options.block_size, Some(QUANT_BLOCK));
    assert_eq!(m.options.compress_embeddings, embeddings);
    let json = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(
        json.contains(&format!("\"compression\": \"{}\"", scheme.label())),
        "{json}"
    );
    assert!(json.contains("\"block_size\": 64"), "{json}");
    assert!(rabbit_split::verify(out).unwrap().is_ok());
    for u in &m.units {
        let bytes = std::fs::read(out.join(&u.file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let data = &bytes[u.data_offset as usize..];
        let names = st.names();
        assert_eq!(names.len(), u.tensors.len());
        let sizes: Vec<usize> = u.tensors.iter().map(|t| t.dtype.size_bytes()).collect();
        assert!(
            sizes.windows(2).all(|w| w[0] >= w[1]),
            "{}: widest first",
            u.name
        );
        let quantize_here = matches!(u.kind, rabbit_split::UnitKind::Layer(_))
            || (embeddings
                && matches!(
                    u.kind,
                    rabbit_split::UnitKind::Embedding | rabbit_split::UnitKind::LmHead
                ));
        let mut n_quant = 0;
        for t in &u.tensors {
            let got = &data[t.offset as usize..(t.offset + t.len) as usize];
            assert_eq!(st.tensor(&t.name).unwrap().data(), got);
            if t.name.ends_with(".q") || t.name.ends_with(".scale") {
                continue;
            }
            // Passed through verbatim: norms, biases, and matrices of other units.
            let (d, shape, src) = source_tensor(ckpt, &t.name);
            assert_eq!((t.dtype, &t.shape), (d, &shape));
            assert!(got == src.as_slice(), "{} changed", t.name);
            assert!(
                !(quantize_here && t.name.ends_with(".weight") && shape.len() == 2),
                "{} should be quantized",
                t.name
            );
        }
        for q in &u.quantized {
            n_quant += 1;
            assert!(quantize_here);
            assert!(u.tensor(&q.name).is_none() && st.tensor(&q.name).is_err());
            assert_eq!((q.scheme, q.block_size), (scheme, QUANT_BLOCK));
            assert_eq!(q.codes, format!("{}.q", q.name));
            assert_eq!(q.scales, format!("{}.scale", q.name));
            let (d, shape, x) = source_f32(ckpt, &q.name);
            assert_eq!((q.dtype, &q.shape), (d, &shape));
            let ct = u.tensor(&q.codes).unwrap();
            let blocks = x.len().div_ceil(QUANT_BLOCK);
            let (cd, per_block) = match scheme {
                Compression::Nf4 => (Dtype::U8, 32),
                Compression::Int8 => (Dtype::I8, 64),
            };
            assert_eq!((ct.dtype, ct.shape.clone()), (cd, vec![blocks * per_block]));
            let sc = u.tensor(&q.scales).unwrap();
            assert_eq!((sc.dtype, sc.shape.clone()), (Dtype::F32, vec![blocks]));
            let (want_codes, want_scales) = expected_quant(scheme, &x);
            assert!(st.tensor(&q.codes).unwrap().data() == want_codes.as_slice());
            assert!(st.tensor(&q.scales).unwrap().data() == want_scales.as_slice());
        }
        if matches!(u.kind, rabbit_split::UnitKind::Layer(_)) {
            assert_eq!(n_quant, 7, "{}: the 7 projections", u.name);
        }
    }
    m
}

fn layer_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_str().unwrap().starts_with("layer."))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn wide_spec() -> Spec {
    Spec {
        layers: 2,
        hidden: 256,
        kv: 64,
        inter: 1024,
        vocab: 256,
        ..Spec::tiny()
    }
}

fn split_and_compare(scheme: Compression, max_ratio: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = wide_spec();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let l = layout(&spec);
    let plain = tmp.path().join("plain");
    run_split(&ckpt, &l, &opts_to(&plain)).unwrap();
    let out = tmp.path().join("q");
    let (dir, outcome, _) = run_split(&ckpt, &l, &compressed(&out, scheme, false)).unwrap();
    assert_eq!(dir, out);
    assert!(matches!(outcome, SplitOutcome::Written { .. }));
    check_split(&ckpt, &out, scheme, false);
    let ratio = layer_bytes(&out) as f64 / layer_bytes(&plain) as f64;
    eprintln!("{scheme}: layer files {ratio:.4} x the bf16 split");
    assert!(ratio <= max_ratio, "{scheme}: ratio {ratio}");
    // The embedding, norm and head are byte-identical to the plain split's.
    for f in [
        "embed.safetensors",
        "norm.safetensors",
        "lm_head.safetensors",
    ] {
        let a = std::fs::read(plain.join(f)).unwrap();
        let b = std::fs::read(out.join(f)).unwrap();
        assert!(a == b, "{f}");
    }
    // A second run reuses it.
    let (_, again, _) = run_split(&ckpt, &l, &compressed(&out, scheme, false)).unwrap();
    assert_eq!(again, SplitOutcome::Reused);
}

#[test]
fn nf4_split_of_a_bf16_checkpoint() {
    split_and_compare(Compression::Nf4, 0.30);
}

#[test]
fn int8_split_of_a_bf16_checkpoint() {
    split_and_compare(Compression::Int8, 0.55);
}

#[test]
fn odd_sizes_and_other_float_dtypes_are_padded() {
    // numel of every projection is not a multiple of 64 (20x20, 5x20, 30x20).
    for (dtype, scheme) in [
        (Dtype::F16, Compression::Nf4),
        (Dtype::F32, Compression::Int8),
        (Dtype::BF16, Compression::Nf4),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = Spec {
            layers: 2,
            hidden: 20,
            kv: 5,
            inter: 30,
            vocab: 7,
            dtype,
            norm_dtype: Dtype::F32,
            extras: true,
            ..Spec::tiny()
        };
        let ckpt = tmp.path().join("model");
        write_checkpoint(&ckpt, &spec);
        let out = tmp.path().join("q");
        run_split(&ckpt, &layout(&spec), &compressed(&out, scheme, true)).unwrap();
        let m = check_split(&ckpt, &out, scheme, true);
        let embed = m.unit(rabbit_split::UnitKind::Embedding).unwrap();
        assert_eq!(embed.quantized.len(), 1);
        assert_eq!(embed.quantized[0].shape, [7, 20]);
        assert_eq!(
            embed.tensor("model.embed_tokens.weight.q").unwrap().shape,
            [scheme_codes(scheme, 140)]
        );
        assert!(
            m.unit(rabbit_split::UnitKind::LmHead)
                .unwrap()
                .quantized
                .len()
                == 1
        );
        assert!(m
            .unit(rabbit_split::UnitKind::FinalNorm)
            .unwrap()
            .quantized
            .is_empty());
        let json = std::fs::read_to_string(out.join("manifest.json")).unwrap();
        assert!(json.contains("\"compress_embeddings\": true"));
    }
}

fn scheme_codes(scheme: Compression, numel: usize) -> usize {
    let padded = numel.div_ceil(64) * 64;
    match scheme {
        Compression::Nf4 => padded / 2,
        Compression::Int8 => padded,
    }
}

#[test]
fn a_split_with_other_compression_is_stale_and_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let l = layout(&spec);
    let out = tmp.path().join("out");
    let n = l.units.len();
    let plain = opts_to(&out);
    let nf4 = compressed(&out, Compression::Nf4, false);
    let int8 = compressed(&out, Compression::Int8, false);
    let nf4_emb = compressed(&out, Compression::Nf4, true);

    run_split(&ckpt, &l, &plain).unwrap();
    let json = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(json.contains("\"compression\": null"));
    assert!(
        !json.contains("block_size") && !json.contains("quantized"),
        "{json}"
    );
    assert!(is_current(&out, &ckpt, &l, &plain).unwrap());
    for other in [&nf4, &int8, &nf4_emb] {
        let why = stale_reason(&out, &ckpt, &l, other).unwrap().unwrap();
        assert!(why.contains("different options"), "{why}");
    }
    let mut last = dir_files(&out);
    for opts in [&nf4, &int8, &nf4_emb, &plain] {
        let (_, outcome, events) = run_split(&ckpt, &l, opts).unwrap();
        assert!(
            matches!(
                outcome,
                SplitOutcome::Written {
                    units_written,
                    units_resumed: 0,
                    ..
                } if units_written == n
            ),
            "{opts:?}: {outcome:?}"
        );
        assert!(matches!(
            events[0],
            SplitEvent::Planned {
                already_done: 0,
                ..
            }
        ));
        assert!(is_current(&out, &ckpt, &l, opts).unwrap());
        let m = Manifest::load(&out).unwrap();
        assert_eq!(m.options, opts.settings());
        let now = dir_files(&out);
        assert_ne!(now, last, "{opts:?} rewrote the files");
        last = now;
    }
    // Compressing embeddings without a compression changes nothing.
    let noop = SplitOptions {
        compress_embeddings: true,
        ..plain.clone()
    };
    assert_eq!(noop.settings(), plain.settings());
    assert!(is_current(&out, &ckpt, &l, &noop).unwrap());
}

#[test]
fn a_manifest_with_a_bad_quantized_entry_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let out = tmp.path().join("out");
    run_split(
        &ckpt,
        &layout(&spec),
        &compressed(&out, Compression::Int8, false),
    )
    .unwrap();
    let m = Manifest::load(&out).unwrap();
    let good = m.to_json();
    assert!(Manifest::parse(Path::new("m"), &good).is_ok());
    let mut bad = m.clone();
    bad.units[1].quantized[0].codes = "nope".into();
    let e = Manifest::parse(Path::new("m"), &bad.to_json()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    let mut bad = m.clone();
    bad.units[1].quantized[0].scheme = Compression::Nf4; // codes are I8 of the int8 length
    assert!(Manifest::parse(Path::new("m"), &bad.to_json()).is_err());
    let mut bad = m;
    bad.units[1].quantized[0].block_size = 32;
    assert!(Manifest::parse(Path::new("m"), &bad.to_json()).is_err());
}

// ---- kill -9 and resume ----

const CHILD_ENV: &str = "RABBIT_SPLIT_COMPRESSION_CHILD";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChildCfg {
    ckpt: PathBuf,
    out: PathBuf,
    spec: Spec,
    pause_unit_ms: u64,
}

#[test]
#[ignore = "child process of the compressed crash test"]
fn compression_crash_child() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cfg: ChildCfg = serde_json::from_str(&cfg).unwrap();
    rabbit_split::split(
        &cfg.ckpt,
        &layout(&cfg.spec),
        &compressed(&cfg.out, Compression::Nf4, true),
        &mut |e| {
            if let SplitEvent::UnitDone { .. } = e {
                std::thread::sleep(Duration::from_millis(cfg.pause_unit_ms));
            }
        },
    )
    .unwrap();
}

struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn killed_compressed_split_resumes_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec {
        layers: 6,
        hidden: 64,
        kv: 16,
        inter: 128,
        vocab: 64,
        ..Spec::tiny()
    };
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let l = layout(&spec);
    let reference = tmp.path().join("reference");
    run_split(&ckpt, &l, &compressed(&reference, Compression::Nf4, true)).unwrap();
    let out = tmp.path().join("out");
    let cfg = ChildCfg {
        ckpt: ckpt.clone(),
        out: out.clone(),
        spec: spec.clone(),
        pause_unit_ms: 150,
    };
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "compression_crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, serde_json::to_string(&cfg).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let units = |n: &[String]| n.iter().filter(|x| x.ends_with(".safetensors")).count();
    let start = Instant::now();
    let left = loop {
        let names = file_names(&out);
        if units(&names) >= 3 {
            child.0.kill().unwrap();
            child.0.wait().unwrap();
            break file_names(&out);
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("child exited ({status}) early; files {names:?}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timeout");
        std::thread::sleep(Duration::from_micros(200));
    };
    let done = units(&left);
    assert!(done >= 3 && done < l.units.len(), "{left:?}");
    assert!(!left.iter().any(|n| n == "manifest.json"));
    let (_, outcome, _) = run_split(&ckpt, &l, &compressed(&out, Compression::Nf4, true)).unwrap();
    let SplitOutcome::Written {
        units_written,
        units_resumed,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(units_resumed, done);
    assert_eq!(units_written, l.units.len() - done);
    assert_same_dir(&out, &reference);
    assert!(rabbit_split::verify(&out).unwrap().is_ok());
}

#[test]
fn verify_detects_damage_in_a_compressed_split() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    let ckpt = tmp.path().join("model");
    write_checkpoint(&ckpt, &spec);
    let out = tmp.path().join("out");
    run_split(
        &ckpt,
        &layout(&spec),
        &compressed(&out, Compression::Nf4, false),
    )
    .unwrap();
    let r = rabbit_split::verify(&out).unwrap();
    assert!(r.is_ok() && r.files_checked == layout(&spec).units.len());
    // Flip one byte of a layer's codes.
    let m = Manifest::load(&out).unwrap();
    let u = &m.units[1];
    let t = u.tensor(&u.quantized[0].codes).unwrap();
    let p = out.join(&u.file);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[(u.data_offset + t.offset) as usize] ^= 0x11;
    std::fs::write(&p, bytes).unwrap();
    let r = rabbit_split::verify(&out).unwrap();
    assert_eq!(r.damaged.len(), 1);
    assert!(r.damaged[0].problem.contains("checksum"), "{:?}", r.damaged);
}
