//! Shared fixtures: small synthetic Qwen2-like checkpoints written with the `safetensors` crate
//! (independent of the splitter's own writer), the matching hand-built layout, and helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use rabbit_split::{Dtype, Layout, SplitEvent, SplitOptions, SplitOutcome, UnitKind, UnitSpec};
use serde::{Deserialize, Serialize};

/// Shape of a synthetic checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub layers: usize,
    pub hidden: usize,
    pub kv: usize,
    pub inter: usize,
    pub vocab: usize,
    /// Dtype of the matrices.
    pub dtype: Dtype,
    /// Dtype of norms.
    pub norm_dtype: Dtype,
    pub tied: bool,
    /// 0 or 1 = single model.safetensors, else number of shards.
    pub shards: usize,
    /// Add pass-through tensors (I64, BOOL, U8, F64, odd sizes) and an ignored inv_freq.
    pub extras: bool,
    /// Seed mixed into the tensor data.
    pub seed: u64,
}

impl Spec {
    pub fn tiny() -> Spec {
        Spec {
            layers: 3,
            hidden: 16,
            kv: 4,
            inter: 24,
            vocab: 40,
            dtype: Dtype::BF16,
            norm_dtype: Dtype::BF16,
            tied: false,
            shards: 1,
            extras: false,
            seed: 1,
        }
    }

    /// All tensors (name, dtype, shape) in HF order.
    pub fn tensors(&self) -> Vec<(String, Dtype, Vec<usize>)> {
        let (h, kv, it, d, nd) = (
            self.hidden,
            self.kv,
            self.inter,
            self.dtype,
            self.norm_dtype,
        );
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            d,
            vec![self.vocab, h],
        )];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), nd, vec![h]));
            v.push((format!("{p}.self_attn.q_proj.weight"), d, vec![h, h]));
            v.push((format!("{p}.self_attn.q_proj.bias"), d, vec![h]));
            v.push((format!("{p}.self_attn.k_proj.weight"), d, vec![kv, h]));
            v.push((format!("{p}.self_attn.k_proj.bias"), d, vec![kv]));
            v.push((format!("{p}.self_attn.v_proj.weight"), d, vec![kv, h]));
            v.push((format!("{p}.self_attn.v_proj.bias"), d, vec![kv]));
            v.push((format!("{p}.self_attn.o_proj.weight"), d, vec![h, h]));
            v.push((format!("{p}.post_attention_layernorm.weight"), nd, vec![h]));
            v.push((format!("{p}.mlp.gate_proj.weight"), d, vec![it, h]));
            v.push((format!("{p}.mlp.up_proj.weight"), d, vec![it, h]));
            v.push((format!("{p}.mlp.down_proj.weight"), d, vec![h, it]));
            if self.extras {
                v.push((
                    format!("{p}.self_attn.rotary_emb.inv_freq"),
                    Dtype::F32,
                    vec![h / 2],
                ));
                v.push((format!("{p}.extra.counter"), Dtype::I64, vec![3]));
                v.push((format!("{p}.extra.mask"), Dtype::BOOL, vec![5]));
                v.push((format!("{p}.extra.bytes"), Dtype::U8, vec![3]));
                v.push((format!("{p}.extra.odd_half"), Dtype::F16, vec![3]));
                v.push((format!("{p}.extra.scale"), Dtype::F64, vec![1]));
            }
        }
        v.push(("model.norm.weight".to_string(), nd, vec![h]));
        // A tied checkpoint may still carry a redundant lm_head.weight; keep one to check it is
        // ignored.
        v.push(("lm_head.weight".to_string(), d, vec![self.vocab, h]));
        v
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, d, s)| d.byte_len(s.iter().product::<usize>() as u64).unwrap())
            .sum()
    }
}

/// Deterministic pseudo-random bytes for a tensor.
pub fn tensor_data(name: &str, len: usize, seed: u64) -> Vec<u8> {
    let mut x =
        xxhash_rust::xxh3::xxh3_64(name.as_bytes()) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn st_dtype(d: Dtype) -> safetensors::Dtype {
    serde_json::from_str(&format!("\"{}\"", d.name())).unwrap()
}

/// Writes one safetensors file with the `safetensors` crate.
pub fn write_st(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(st_dtype(*d), s.clone(), b).unwrap(),
            )
        })
        .collect();
    let mut md = HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, Some(md)).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Writes config.json, tokenizer files and the weights (single file or sharded with index).
pub fn write_checkpoint(dir: &Path, spec: &Spec) {
    fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "intermediate_size": spec.inter,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tied,
    });
    fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    fs::write(dir.join("tokenizer.json"), b"{\"model\":{}}").unwrap();
    fs::write(dir.join("tokenizer_config.json"), b"{}").unwrap();
    fs::write(dir.join("generation_config.json"), b"{}").unwrap();

    let all: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = spec
        .tensors()
        .into_iter()
        .map(|(n, d, s)| {
            let len = d.byte_len(s.iter().product::<usize>() as u64).unwrap() as usize;
            let data = tensor_data(&n, len, spec.seed);
            (n, d, s, data)
        })
        .collect();
    if spec.shards <= 1 {
        write_st(&dir.join("model.safetensors"), &all);
        return;
    }
    let n = spec.shards;
    let per = all.len().div_ceil(n);
    let mut weight_map = BTreeMap::new();
    for (k, chunk) in all.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        for t in chunk {
            weight_map.insert(t.0.clone(), name.clone());
        }
        write_st(&dir.join(&name), chunk);
    }
    let index = serde_json::json!({
        "metadata": {"total_size": spec.total_bytes()},
        "weight_map": weight_map,
    });
    fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// The Qwen2-like layout for `spec`, built by hand (as rabbit-models would).
pub fn layout(spec: &Spec) -> Layout {
    let mut units = vec![UnitSpec {
        name: "embed".into(),
        kind: UnitKind::Embedding,
        required: vec!["model.embed_tokens.weight".into()],
        optional: vec![],
    }];
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let req = [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.weight",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.weight",
            "self_attn.v_proj.bias",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        let opt = [
            "self_attn.q_norm.weight",
            "extra.counter",
            "extra.mask",
            "extra.bytes",
            "extra.odd_half",
            "extra.scale",
        ];
        units.push(UnitSpec {
            name: format!("layer.{i:03}"),
            kind: UnitKind::Layer(i),
            required: req.iter().map(|s| format!("{p}.{s}")).collect(),
            optional: opt.iter().map(|s| format!("{p}.{s}")).collect(),
        });
    }
    units.push(UnitSpec {
        name: "norm".into(),
        kind: UnitKind::FinalNorm,
        required: vec!["model.norm.weight".into()],
        optional: vec![],
    });
    let mut ignored = vec!["rotary_emb.inv_freq".to_string()];
    if spec.tied {
        ignored.push("lm_head.weight".into());
    } else {
        units.push(UnitSpec {
            name: "lm_head".into(),
            kind: UnitKind::LmHead,
            required: vec!["lm_head.weight".into()],
            optional: vec![],
        });
    }
    Layout {
        architecture: "Qwen2ForCausalLM".into(),
        units,
        tied_lm_head: spec.tied,
        ignored_suffixes: ignored,
        ignored_prefixes: vec![],
        aliases: vec![],
        row_orders: vec![],
        shapes: Default::default(),
        groups: Default::default(),
        uncompressed: vec![],
        stacked: vec![],
    }
}

/// Options writing to `out`.
pub fn opts_to(out: &Path) -> SplitOptions {
    SplitOptions {
        out_dir: Some(out.to_path_buf()),
        ..SplitOptions::default()
    }
}

/// Runs a split, collecting events.
pub fn run_split(
    ckpt: &Path,
    layout: &Layout,
    opts: &SplitOptions,
) -> rabbit_split::Result<(PathBuf, SplitOutcome, Vec<SplitEvent>)> {
    let mut events = Vec::new();
    let (dir, outcome) = rabbit_split::split(ckpt, layout, opts, &mut |e| events.push(e.clone()))?;
    Ok((dir, outcome, events))
}

/// Every regular file of a directory (non-recursive) with its bytes, except the verification
/// record: it holds this machine's file identities (inodes, times), not split content.
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file()
            && e.file_name() != rabbit_split::integrity::VERIFIED_FILE
        {
            m.insert(
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

/// Names of the entries of a directory, sorted (safe to call while another process renames
/// and deletes files in it).
pub fn file_names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Reads a tensor's bytes from the source checkpoint with the `safetensors` crate.
pub fn source_tensor(ckpt: &Path, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
    let mut files = vec![];
    if ckpt.join("model.safetensors").exists() {
        files.push(ckpt.join("model.safetensors"));
    } else {
        for e in fs::read_dir(ckpt).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                files.push(p);
            }
        }
    }
    for f in files {
        let bytes = fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        if let Ok(t) = st.tensor(name) {
            let d: Dtype = format!("{:?}", t.dtype()).parse().unwrap();
            return (d, t.shape().to_vec(), t.data().to_vec());
        }
    }
    panic!("tensor {name} not in {}", ckpt.display());
}

/// Asserts two directories hold exactly the same files with the same bytes.
pub fn assert_same_dir(a: &Path, b: &Path) {
    let fa = dir_files(a);
    let fb = dir_files(b);
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "file sets differ"
    );
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Creates a FIFO (named pipe) at `path`: opening it for reading blocks until a writer comes.
pub fn mkfifo(path: &Path) {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
}

/// Runs `f` on its own thread and fails the test if it has not returned within a minute: a
/// bounded join for code that must not hang (a generous bound, not a performance figure).
pub fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} hangs"),
        Err(e) => panic!("{what} panicked ({e})"),
    }
}
