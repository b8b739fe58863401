//! Writing a planned checkpoint: the stamp first, then the tokenizer files, the weights and the
//! index, `config.json` last.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::plan::{plan, tokenizer};
use super::stamp::{inspect_dir, is_our_file, reusable, DirState, Stamp, GENERATOR};
use super::{
    io_err, weights, SynthError, SynthOptions, SynthProgress, SynthReport, FORMAT_VERSION,
    STAMP_FILE,
};

/// Writes a small file atomically (`<name>.tmp`, fsync, rename); returns its size.
/// The project's one atomic write (unique temporary, fsync, rename, fsync of the directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<u64, SynthError> {
    rabbit_split::fsutil::write_atomic(path, bytes)?;
    Ok(bytes.len() as u64)
}

fn sync_dir(dir: &Path) -> Result<(), SynthError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON value serializes");
    s.push('\n');
    s.into_bytes()
}

/// Writes the checkpoint described by `opts` (see the module docs). `progress` is called with
/// [`SynthProgress`] events as work advances.
pub fn synthesize(
    opts: &SynthOptions,
    progress: &mut dyn FnMut(SynthProgress),
) -> Result<SynthReport, SynthError> {
    let plan = plan(opts)?;
    let dir = opts.out_dir.as_path();
    let state = inspect_dir(dir)?;
    let report =
        |files: Vec<PathBuf>, bytes_written: u64, total_bytes: u64, reused: bool| SynthReport {
            out_dir: dir.to_path_buf(),
            config: plan.config.clone(),
            spec: plan.spec.clone(),
            num_parameters: plan.num_parameters,
            bytes_written,
            total_bytes,
            files,
            reused,
            tokenizer_size: plan.tokenizer_size,
        };

    if let DirState::Ours(Some(stamp)) = &state {
        if reusable(dir, stamp, &plan.stamp) {
            progress(SynthProgress::Reused);
            let mut files: Vec<PathBuf> = stamp.files.keys().map(|n| dir.join(n)).collect();
            files.push(dir.join("config.json"));
            let total = stamp.files.values().sum::<u64>()
                + fs::metadata(dir.join("config.json")).map_or(0, |m| m.len());
            return Ok(report(files, 0, total, true));
        }
    }
    if let DirState::Ours(_) = state {
        // Mark the directory incomplete first, then clear the rest of our old output.
        let cfg = dir.join("config.json");
        match fs::remove_file(&cfg) {
            Ok(()) => sync_dir(dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&cfg)(e)),
        }
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != STAMP_FILE && is_our_file(&name) {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
    }

    let tok = tokenizer()?;
    let mut stamp = Stamp {
        generator: GENERATOR.to_string(),
        format: FORMAT_VERSION,
        options: plan.stamp.clone(),
        complete: false,
        files: BTreeMap::new(),
    };
    write_atomic(
        &dir.join(STAMP_FILE),
        &pretty(&serde_json::to_value(&stamp).expect("stamp")),
    )?;
    sync_dir(dir)?;
    progress(SynthProgress::Started {
        num_parameters: plan.num_parameters,
        weight_bytes: plan.weight_bytes,
        weight_files: plan.shards.len(),
    });

    let mut written = 0u64;
    let mut files = Vec::new();
    let mut record =
        |name: &str, bytes: u64, stamp: &mut Stamp, progress: &mut dyn FnMut(SynthProgress)| {
            let path = dir.join(name);
            stamp.files.insert(name.to_string(), bytes);
            written += bytes;
            files.push(path.clone());
            progress(SynthProgress::FileWritten { path, bytes });
        };
    let model_max_length = plan.spec.max_position_embeddings;
    let small: [(&str, Vec<u8>); 5] = [
        ("tokenizer.json", tok.tokenizer_json().into_bytes()),
        (
            "tokenizer_config.json",
            pretty(&tok.tokenizer_config_json(model_max_length)),
        ),
        ("vocab.json", tok.vocab_json().into_bytes()),
        ("merges.txt", tok.merges_txt().into_bytes()),
        (
            "generation_config.json",
            pretty(&plan.generation_config_json),
        ),
    ];
    for (name, bytes) in small {
        let n = write_atomic(&dir.join(name), &bytes)?;
        record(name, n, &mut stamp, progress);
    }

    let total = plan.weight_bytes;
    let mut done = 0u64;
    // The special tokens follow the BPE tokens.
    let rules = weights::InitRules::for_spec(&plan.spec).with_head_rows(tok.bpe_len());
    let threads = weights::default_threads();
    let mut weight_map = BTreeMap::new();
    for shard in &plan.shards {
        let written_file = weights::write_shard(
            dir,
            shard,
            weights::WeightGen {
                dtype: plan.dtype.safetensors(),
                seed: plan.seed,
                rules: &rules,
                live_rows: plan.tokenizer_size,
            },
            threads,
            &mut |n| {
                done += n;
                progress(SynthProgress::Weights { done, total });
            },
        )?;
        record(&shard.file_name, written_file.size, &mut stamp, progress);
        for (name, _) in &shard.tensors {
            weight_map.insert(name.clone(), shard.file_name.clone());
        }
    }
    if plan.shards.len() > 1 {
        let index = json!({
            "metadata": {"total_size": plan.weight_bytes},
            "weight_map": weight_map,
        });
        let name = "model.safetensors.index.json";
        let n = write_atomic(&dir.join(name), &pretty(&index))?;
        record(name, n, &mut stamp, progress);
    }

    stamp.complete = true;
    let stamp_bytes = pretty(&serde_json::to_value(&stamp).expect("stamp"));
    write_atomic(&dir.join(STAMP_FILE), &stamp_bytes)?;
    sync_dir(dir)?;
    // config.json last: its presence means the checkpoint is complete.
    let n = write_atomic(&dir.join("config.json"), &pretty(&plan.config_json))?;
    sync_dir(dir)?;
    record("config.json", n, &mut stamp, progress);
    let total_bytes = written;
    Ok(report(files, written, total_bytes, false))
}
