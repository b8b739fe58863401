//! criterion benches of the streaming pipeline's pieces on a synthetic model made at start-up
//! (qwen2.5-0.5b widths, 4 layers, bf16): reading a layer file (mmap view, and pread copy),
//! staging its bytes into tensors, dequantizing a 4bit/8bit layer, one decoder layer's compute,
//! and a whole decode step streamed (from the split, and in place from the checkpoint) vs
//! resident. `cargo bench --bench pipeline` (after `source scripts/env.sh`).

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use rabbitllm::core::reader::{measure_read, ReadMode};
use rabbitllm::core::weights::{DequantBuffers, UnitTensors};
use rabbitllm::models::synth::{synthesize, SynthOptions, SynthOverrides};
use rabbitllm::split::Compression;
use rabbitllm::{
    AutoModel, Control, DType, DeviceSpec, GenerateRequest, LoadOptions, Model, SplitPolicy,
};

fn model(dir: &Path, resident: usize, split: SplitPolicy) -> Model {
    AutoModel::from_pretrained(
        dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::BF16)
            .resident_layers(resident)
            .split_policy(split),
    )
    .expect("synthetic model loads")
}

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut opts = SynthOptions::new("qwen2", "qwen2.5-0.5b", &dir);
    opts.overrides = SynthOverrides {
        layers: Some(4),
        vocab: Some(1024),
        ..Default::default()
    };
    synthesize(&opts, &mut |_| {}).expect("synth");

    // The split's pieces (its unit files are what `read_layer`/`stage_layer` read).
    let mut streamed = model(&dir, 0, SplitPolicy::Always);
    let split = streamed.engine.source_dir().to_path_buf();
    let units: Vec<_> = streamed.engine.layer_units().to_vec();
    let layer = &units[0];

    let mut g = c.benchmark_group("read_layer");
    g.throughput(criterion::Throughput::Bytes(layer.data_len));
    g.bench_function("mmap_view", |b| {
        b.iter(|| measure_read(&split, &[layer], ReadMode::Map, false).unwrap())
    });
    g.bench_function("pread_copy", |b| {
        b.iter(|| measure_read(&split, &[layer], ReadMode::Copy, false).unwrap())
    });
    g.finish();

    let bytes = std::fs::read(split.join(&layer.file)).unwrap();
    let region = &bytes[layer.data_offset as usize..(layer.data_offset + layer.data_len) as usize];
    let mut g = c.benchmark_group("stage_layer");
    g.throughput(criterion::Throughput::Bytes(layer.data_len));
    g.bench_function("views_bf16", |b| {
        b.iter(|| {
            UnitTensors::from_region(layer, region, tch::Device::Cpu, tch::Kind::BFloat16).unwrap()
        })
    });
    g.bench_function("convert_to_f32", |b| {
        b.iter(|| {
            UnitTensors::from_region(layer, region, tch::Device::Cpu, tch::Kind::Float).unwrap()
        })
    });
    g.finish();

    // Dequantizing one compressed layer (the CPU-side cost a compressed split adds per layer).
    let mut g = c.benchmark_group("dequantize_layer");
    for compression in [Compression::Nf4, Compression::Int8] {
        let m = AutoModel::from_pretrained(
            dir.to_str().unwrap(),
            LoadOptions::default()
                .device(DeviceSpec::Cpu)
                .dtype(DType::BF16)
                .resident_layers(0)
                .compression(Some(compression)),
        )
        .expect("compressed split");
        let unit = m.engine.layer_units()[0].clone();
        let bytes = std::fs::read(m.engine.source_dir().join(&unit.file)).unwrap();
        let region =
            bytes[unit.data_offset as usize..(unit.data_offset + unit.data_len) as usize].to_vec();
        let values: u64 = unit
            .quantized
            .iter()
            .map(|q| q.shape.iter().product::<usize>() as u64)
            .sum();
        g.throughput(criterion::Throughput::Elements(values));
        // As the engine does it: into reused buffers, handed back after each layer.
        let mut buffers = DequantBuffers::default();
        g.bench_function(format!("{}_to_bf16", compression.label()), |b| {
            b.iter(|| {
                let u = UnitTensors::from_region_into(
                    &unit,
                    &region,
                    tch::Device::Cpu,
                    tch::Kind::BFloat16,
                    Some(&mut buffers),
                )
                .unwrap();
                buffers.reclaim(u.into_tensors());
            })
        });
    }
    g.finish();

    let req = GenerateRequest {
        sequences: vec![vec![1, 2, 3, 4, 5, 6, 7, 8]],
        max_new_tokens: 4,
        ..Default::default()
    };
    let mut g = c.benchmark_group("generate_4_tokens");
    g.sample_size(10);
    g.bench_function("streamed", |b| {
        b.iter(|| streamed.generate(&req, &mut |_| Control::Continue).unwrap())
    });
    drop(streamed);
    let mut in_place = model(&dir, 0, SplitPolicy::Never);
    g.bench_function("streamed_in_place", |b| {
        b.iter(|| in_place.generate(&req, &mut |_| Control::Continue).unwrap())
    });
    drop(in_place);
    let mut resident = model(&dir, usize::MAX, SplitPolicy::Auto);
    g.bench_function("resident", |b| {
        b.iter(|| resident.generate(&req, &mut |_| Control::Continue).unwrap())
    });
    g.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
