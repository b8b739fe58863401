//! criterion: one greedy generation (prefill + 8 new tokens) of rabbit next to AirLLM 4.0.0 on
//! the same small synthetic checkpoint (qwen2.5-0.5b widths, 2 layers, vocab 1024, bf16, made at
//! start-up), same prompt ids, every decoder layer streamed, CPU (issue #6).
//!
//! `cargo bench --bench airllm` (after `source scripts/env.sh`). The AirLLM rows need the venv of
//! `benches/airllm/setup_venv.sh` (`$AIRLLM_PYTHON`, else `$AIRLLM_VENV/bin/python`, else
//! `${RABBIT_CACHE:-~/.cache/rabbitllm}/venv-airllm-4.0.0/bin/python`); without it they are skipped
//! with a message. AirLLM runs in one long-lived `run_airllm.py --mode serve` process per variant,
//! so Python start-up, imports and the load are paid once; each sample is the in-process time of
//! `generate()` as that process measures it (rabbit's: the time of `Model::generate`).
//!
//! Rows: `rabbit_streamed` (`--resident-layers 0`), `airllm_as_shipped`, and
//! `airllm_no_gc_patched` (AirLLM with its per-module `clean_memory()` replaced by a no-op at
//! runtime; not something AirLLM ships). The full side-by-side matrix with split/load/prefill/
//! memory/token agreement is `benches/airllm/run.sh`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rabbitllm::models::synth::{synthesize, SynthOptions, SynthOverrides};
use rabbitllm::{AutoModel, Control, DType, DeviceSpec, GenerateRequest, LoadOptions};
use serde_json::Value;

const NEW_TOKENS: usize = 8;
const PROMPT_LEN: usize = 16;

/// The python of the AirLLM venv, when it is installed.
fn airllm_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AIRLLM_PYTHON") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let venv = match std::env::var_os("AIRLLM_VENV") {
        Some(v) => PathBuf::from(v),
        None => {
            let cache = std::env::var_os("RABBIT_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rabbitllm"))
                })?;
            cache.join("venv-airllm-4.0.0")
        }
    };
    let python = venv.join("bin/python");
    (python.exists() && venv.join(".airllm-ok").exists()).then_some(python)
}

/// Seeded prompt ids inside the synthetic tokenizer's ordinary vocabulary.
fn prompt() -> Vec<u32> {
    (0..PROMPT_LEN as u32)
        .map(|i| (i * 37 + 11) % 600)
        .collect()
}

/// One `run_airllm.py --mode serve` process: the model loaded once, generations on request.
struct AirllmServer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl AirllmServer {
    fn start(python: &Path, model: &Path, work: &Path, variant: &str) -> Result<Self, String> {
        let ids = work.join("prompt.txt");
        let line: Vec<String> = prompt().iter().map(u32::to_string).collect();
        std::fs::write(&ids, line.join(",") + "\n").map_err(|e| e.to_string())?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/airllm/run_airllm.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["--mode", "serve", "--variant", variant, "--device", "cpu"])
            .args(["--new-tokens", &NEW_TOKENS.to_string()])
            .arg("--model")
            .arg(model)
            .arg("--split-root")
            .arg(work.join("airllm-split"))
            .arg("--prompt-ids-file")
            .arg(&ids)
            .env("HF_HUB_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", python.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut server = AirllmServer {
            child,
            stdin,
            stdout,
        };
        let ready = server.reply()?;
        if ready["ready"] != true {
            return Err(format!("unexpected first reply: {ready}"));
        }
        Ok(server)
    }

    /// The next JSON line on the server's stdout (AirLLM's own prints are skipped).
    fn reply(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .stdout
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the AirLLM process exited without an answer".into());
            }
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                if v["ok"] == true {
                    return Ok(v);
                }
                return Err(format!("AirLLM failed: {}", v["error"]));
            }
        }
    }

    /// Runs `iters` generations and returns the sum of their in-process times.
    fn generate(&mut self, iters: u64) -> Result<Duration, String> {
        let stdin = self.stdin.as_mut().expect("open until drop");
        writeln!(stdin, "{iters}")
            .and_then(|_| stdin.flush())
            .map_err(|e| e.to_string())?;
        let v = self.reply()?;
        let total: f64 = v["generate_s"]
            .as_array()
            .ok_or_else(|| format!("no generate_s in {v}"))?
            .iter()
            .filter_map(Value::as_f64)
            .sum();
        Ok(Duration::from_secs_f64(total))
    }
}

impl Drop for AirllmServer {
    fn drop(&mut self) {
        // EOF makes the server exit; std has no wait with a timeout: give it 10 s, then kill it.
        drop(self.stdin.take());
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn side_by_side(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut opts = SynthOptions::new("qwen2", "qwen2.5-0.5b", &dir);
    opts.overrides = SynthOverrides {
        layers: Some(2),
        vocab: Some(1024),
        ..Default::default()
    };
    synthesize(&opts, &mut |_| {}).expect("synth");

    let mut g = c.benchmark_group("airllm_side_by_side");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(NEW_TOKENS as u64));

    let mut rabbit = AutoModel::from_pretrained(
        dir.to_str().unwrap(),
        LoadOptions::default()
            .device(DeviceSpec::Cpu)
            .dtype(DType::BF16)
            .resident_layers(0),
    )
    .expect("synthetic model loads");
    // As the harness runs AirLLM: greedy, exactly NEW_TOKENS tokens, no EOS stop.
    let req = GenerateRequest {
        sequences: vec![prompt()],
        max_new_tokens: NEW_TOKENS,
        ..Default::default()
    };
    g.bench_function("rabbit_streamed", |b| {
        b.iter(|| rabbit.generate(&req, &mut |_| Control::Continue).unwrap())
    });
    drop(rabbit);

    match airllm_python() {
        None => eprintln!(
            "airllm_side_by_side: AirLLM rows skipped: no AirLLM venv (run benches/airllm/setup_venv.sh, \
             or set AIRLLM_PYTHON)"
        ),
        Some(python) => {
            // As shipped, one generation takes seconds: a longer target time for its 10 samples.
            for (name, variant, secs) in [
                ("airllm_as_shipped", "airllm", 60),
                ("airllm_no_gc_patched", "airllm-no-gc", 10),
            ] {
                g.measurement_time(Duration::from_secs(secs));
                let mut server = match AirllmServer::start(&python, &dir, tmp.path(), variant) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("airllm_side_by_side/{name}: skipped: {e}");
                        continue;
                    }
                };
                g.bench_function(name, |b| {
                    b.iter_custom(|iters| server.generate(iters).expect("AirLLM generate"))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(airllm, side_by_side);
criterion_main!(airllm);
