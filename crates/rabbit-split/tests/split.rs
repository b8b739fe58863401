//! Splitting valid checkpoints: file set, safetensors validity, alignment, tensor order, bytes,
//! manifest contents, events, and the checkpoint reader.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use rabbit_split::{
    default_split_dir, verify, Checkpoint, Dtype, Manifest, SplitEvent, SplitOptions, SplitOutcome,
    UnitKind,
};

/// Checks every unit file of a split against the manifest and the source checkpoint.
fn check_split(ckpt: &Path, dir: &Path, alignment: u64) -> Manifest {
    let m = Manifest::load(dir).unwrap();
    assert_eq!(m.format, "rabbit-split");
    assert_eq!(m.format_version, 1);
    assert_eq!(m.options.alignment, alignment);
    assert_eq!(m.options.compression, None);
    assert_eq!(
        m.source_fingerprint,
        rabbit_split::source_fingerprint(ckpt).unwrap()
    );
    for u in &m.units {
        assert_eq!(u.file, format!("{}.safetensors", u.name));
        let bytes = fs::read(dir.join(&u.file)).unwrap();
        assert_eq!(bytes.len() as u64, u.size);
        assert_eq!(
            u.checksum,
            format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
        );
        // A valid safetensors file per the reference implementation.
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{} is not valid safetensors: {e:?}", u.file));
        assert_eq!(st.len(), u.tensors.len());
        // Data region: aligned start, exactly the end of the file.
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(8 + header_len, u.data_offset);
        assert_eq!(u.data_offset % alignment, 0, "{}", u.file);
        assert_eq!(u.data_offset + u.data_len, u.size);
        // Padding is spaces after the JSON.
        let header = std::str::from_utf8(&bytes[8..u.data_offset as usize]).unwrap();
        let trimmed = header.trim_end_matches(' ');
        assert!(trimmed.ends_with('}'), "{}", u.file);
        let json: serde_json::Value = serde_json::from_str(trimmed).unwrap();
        let md = &json["__metadata__"];
        assert_eq!(md["format"], "rabbit-split");
        assert_eq!(md["format_version"], "1");
        assert_eq!(md["source_fingerprint"], m.source_fingerprint.as_str());
        assert_eq!(md["unit"], u.name.as_str());

        // One read of the data region gives every tensor in place.
        let f = fs::File::open(dir.join(&u.file)).unwrap();
        let mut region = vec![0u8; u.data_len as usize];
        f.read_exact_at(&mut region, u.data_offset).unwrap();
        let mut pos = 0;
        let mut prev_size = usize::MAX;
        for t in &u.tensors {
            assert_eq!(t.offset, pos, "tensors must be contiguous in {}", u.file);
            pos += t.len;
            assert_eq!(
                (u.data_offset + t.offset) % t.dtype.size_bytes() as u64,
                0,
                "{} in {} is not naturally aligned",
                t.name,
                u.file
            );
            assert!(
                t.dtype.size_bytes() <= prev_size,
                "widest dtypes first in {}",
                u.file
            );
            prev_size = t.dtype.size_bytes();
            let (sd, ss, sb) = source_tensor(ckpt, &t.name);
            assert_eq!((sd, &ss), (t.dtype, &t.shape), "{}", t.name);
            assert_eq!(
                &region[t.offset as usize..(t.offset + t.len) as usize],
                &sb[..]
            );
            let view = st.tensor(&t.name).unwrap();
            assert_eq!(view.data(), &sb[..]);
            assert_eq!(view.shape(), &t.shape[..]);
        }
        assert_eq!(pos, u.data_len);
    }
    let report = verify(dir).unwrap();
    assert!(report.is_ok(), "{:?}", report.damaged);
    assert_eq!(report.files_checked, m.units.len());
    assert_eq!(
        report.bytes_checked,
        m.units.iter().map(|u| u.size).sum::<u64>()
    );
    m
}

#[test]
fn single_file_bf16_checkpoint_splits_into_aligned_units() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    let spec = Spec::tiny();
    write_checkpoint(&ckpt, &spec);
    let layout = layout(&spec);
    let (dir, outcome, events) = run_split(&ckpt, &layout, &SplitOptions::default()).unwrap();
    assert_eq!(dir, default_split_dir(&ckpt));
    assert_eq!(dir, ckpt.join("rabbit-split"));
    assert_eq!(
        file_names(&dir),
        [
            "embed.safetensors",
            "layer.000.safetensors",
            "layer.001.safetensors",
            "layer.002.safetensors",
            "lm_head.safetensors",
            "manifest.json",
            "norm.safetensors",
            "split.plan.json",
            "split.verified.json"
        ]
    );
    let m = check_split(&ckpt, &dir, 4096);
    assert_eq!(m.architecture, "Qwen2ForCausalLM");
    assert!(!m.tied_lm_head && !m.original_deleted);
    assert_eq!(m.num_layers(), 3);
    let names: Vec<&str> = m.units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "embed",
            "layer.000",
            "layer.001",
            "layer.002",
            "norm",
            "lm_head"
        ]
    );
    assert_eq!(m.unit(UnitKind::LmHead).unwrap().name, "lm_head");
    assert_eq!(m.unit(UnitKind::Layer(1)).unwrap().name, "layer.001");
    let kinds: Vec<UnitKind> = m.layers().map(|u| u.kind).collect();
    assert_eq!(
        kinds,
        [UnitKind::Layer(0), UnitKind::Layer(1), UnitKind::Layer(2)]
    );
    // All-BF16 layer: layout order is kept.
    let l0: Vec<&str> = m.units[1].tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        l0,
        layout.units[1]
            .required
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );

    let total_size: u64 = m.units.iter().map(|u| u.size).sum();
    let mut expected = vec![SplitEvent::Planned {
        units: 6,
        bytes: total_size,
        already_done: 0,
    }];
    for (i, u) in m.units.iter().enumerate() {
        expected.push(SplitEvent::UnitDone {
            index: i,
            total: 6,
            name: u.name.clone(),
            bytes: u.size,
        });
    }
    assert_eq!(events, expected);
    assert_eq!(
        outcome,
        SplitOutcome::Written {
            bytes_written: total_size,
            units_written: 6,
            units_resumed: 0
        }
    );
    // The manifest stores layer order and kinds readably.
    let text = fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(text.contains("\"layer.002.safetensors\""), "{text}");
    assert!(
        !text.contains(&*tmp.path().to_string_lossy()),
        "no absolute paths in the manifest"
    );
}

#[test]
fn sharded_checkpoint_with_mixed_dtypes_keeps_every_tensor_aligned() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    let spec = Spec {
        shards: 3,
        extras: true,
        dtype: Dtype::BF16,
        norm_dtype: Dtype::F32,
        kv: 3, // odd byte counts for the k/v biases
        ..Spec::tiny()
    };
    write_checkpoint(&ckpt, &spec);
    assert!(ckpt.join("model-00003-of-00003.safetensors").exists());
    let out = tmp.path().join("split");
    let layout = layout(&spec);
    let (dir, _, _) = run_split(&ckpt, &layout, &opts_to(&out)).unwrap();
    assert_eq!(dir, out);
    let m = check_split(&ckpt, &dir, 4096);
    let l1 = m.unit(UnitKind::Layer(1)).unwrap();
    let order: Vec<(&str, Dtype)> = l1
        .tensors
        .iter()
        .map(|t| (t.name.strip_prefix("model.layers.1.").unwrap(), t.dtype))
        .collect();
    assert_eq!(
        order,
        [
            ("extra.counter", Dtype::I64),
            ("extra.scale", Dtype::F64),
            ("input_layernorm.weight", Dtype::F32),
            ("post_attention_layernorm.weight", Dtype::F32),
            ("self_attn.q_proj.weight", Dtype::BF16),
            ("self_attn.q_proj.bias", Dtype::BF16),
            ("self_attn.k_proj.weight", Dtype::BF16),
            ("self_attn.k_proj.bias", Dtype::BF16),
            ("self_attn.v_proj.weight", Dtype::BF16),
            ("self_attn.v_proj.bias", Dtype::BF16),
            ("self_attn.o_proj.weight", Dtype::BF16),
            ("mlp.gate_proj.weight", Dtype::BF16),
            ("mlp.up_proj.weight", Dtype::BF16),
            ("mlp.down_proj.weight", Dtype::BF16),
            ("extra.odd_half", Dtype::F16),
            ("extra.mask", Dtype::BOOL),
            ("extra.bytes", Dtype::U8),
        ]
    );
    // The ignored inv_freq tensors went nowhere.
    assert!(m
        .units
        .iter()
        .flat_map(|u| &u.tensors)
        .all(|t| !t.name.contains("inv_freq")));
}

#[test]
fn tied_embeddings_produce_no_lm_head_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    let spec = Spec {
        tied: true,
        dtype: Dtype::F32,
        norm_dtype: Dtype::F32,
        ..Spec::tiny()
    };
    write_checkpoint(&ckpt, &spec);
    let (dir, _, _) = run_split(&ckpt, &layout(&spec), &SplitOptions::default()).unwrap();
    assert!(!dir.join("lm_head.safetensors").exists());
    let m = check_split(&ckpt, &dir, 4096);
    assert!(m.tied_lm_head);
    assert!(m.unit(UnitKind::LmHead).is_none());
    assert!(m
        .units
        .iter()
        .flat_map(|u| &u.tensors)
        .all(|t| t.name != "lm_head.weight"));
}

#[test]
fn alignment_option_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    let spec = Spec::tiny();
    write_checkpoint(&ckpt, &spec);
    let opts = SplitOptions {
        alignment: 65536,
        ..opts_to(&tmp.path().join("s64k"))
    };
    let (dir, _, _) = run_split(&ckpt, &layout(&spec), &opts).unwrap();
    let m = check_split(&ckpt, &dir, 65536);
    assert!(m.units.iter().all(|u| u.data_offset == 65536));
}

#[test]
fn checkpoint_reader_reads_headers_and_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    for shards in [1, 2] {
        let ckpt = tmp.path().join(format!("model{shards}"));
        let spec = Spec {
            shards,
            extras: true,
            ..Spec::tiny()
        };
        write_checkpoint(&ckpt, &spec);
        let c = Checkpoint::open(&ckpt).unwrap();
        assert_eq!(c.files.len(), shards);
        assert_eq!(c.index.is_some(), shards > 1);
        let expected = spec.tensors();
        assert_eq!(c.tensors().count(), expected.len());
        let mut buf = Vec::new();
        for (name, dtype, shape) in &expected {
            let loc = c.tensor(name).unwrap();
            assert_eq!((&loc.dtype, &loc.shape), (dtype, shape));
            c.read_tensor(name, &mut buf).unwrap();
            assert_eq!(buf, source_tensor(&ckpt, name).2, "{name}");
            assert_eq!(loc.len as usize, buf.len());
            // The absolute offset is right in the file.
            let mut raw = vec![0u8; loc.len as usize];
            fs::File::open(&loc.file)
                .unwrap()
                .read_exact_at(&mut raw, loc.offset)
                .unwrap();
            assert_eq!(raw, buf);
        }
        let e = c.read_tensor("nope", &mut buf).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let fp = c.fingerprint().unwrap();
        assert!(fp.starts_with("xxh3:") && fp.len() == 21, "{fp}");
        assert_eq!(fp, rabbit_split::source_fingerprint(&ckpt).unwrap());
        let cfg = rabbit_split::read_config_json(&ckpt).unwrap();
        assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    }
}

#[test]
fn aligned_writer_output_is_readable_as_a_plain_checkpoint() {
    // The writer doubles as the synthetic-checkpoint generator (alignment 8).
    use rabbit_split::{AlignedWriter, TensorHeader};
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    fs::create_dir_all(&ckpt).unwrap();
    let spec = Spec::tiny();
    let tensors = spec.tensors();
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|(n, d, s)| TensorHeader {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let mut md = std::collections::BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let mut w = AlignedWriter::create(&ckpt.join("model.safetensors"), headers, md, 8).unwrap();
    for (n, d, s) in &tensors {
        let len = d.byte_len(s.iter().product::<usize>() as u64).unwrap() as usize;
        let data = tensor_data(n, len, 7);
        for chunk in data.chunks(5) {
            w.write_data(chunk).unwrap();
        }
    }
    let written = w.finish().unwrap();
    fs::write(ckpt.join("config.json"), b"{}").unwrap();
    let c = Checkpoint::open(&ckpt).unwrap();
    let mut buf = Vec::new();
    c.read_tensor("model.layers.2.mlp.up_proj.weight", &mut buf)
        .unwrap();
    assert_eq!(
        buf,
        tensor_data("model.layers.2.mlp.up_proj.weight", buf.len(), 7)
    );
    assert_eq!(written.size, fs::metadata(&written.path).unwrap().len());
    // And it splits like any checkpoint.
    let (dir, _, _) = run_split(&ckpt, &layout(&spec), &SplitOptions::default()).unwrap();
    check_split(&ckpt, &dir, 4096);
}
