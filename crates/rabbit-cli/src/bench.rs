//! `rabbit bench` and `rabbit info`: measured figures and the residency plan.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rabbit_core::bench::{self, BenchConfig, BenchReport};
use rabbit_core::plan::host_available;
use rabbit_core::reader::measure_regions;
use serde_json::json;

use crate::load::ModelArgs;
use crate::out::{note, outln};
use crate::report::{head_note, human_bytes};
use crate::speculate::StepArgs;

/// Arguments of `rabbit bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    step: StepArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Read streamed layers from the disk every sweep (drop them from the page cache after use),
    /// as for a model larger than RAM.
    #[arg(long)]
    cold: bool,
    /// Skip the fully resident compute-only baseline run.
    #[arg(long)]
    no_baseline: bool,
    /// Seed of the prompt ids (and of the sampling, with --temperature).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sample at this temperature instead of decoding greedily (a random model's greedy output
    /// soon repeats itself; sampled text routes its tokens to varied experts).
    #[arg(long, value_parser = positive_temperature)]
    temperature: Option<f64>,
    /// Take the prompt ids from this file instead: one sequence per line, ids separated by commas
    /// or spaces (or a JSON list of lists); the file sets the batch and the prompt length.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["batch", "prompt_len", "seed"])]
    prompt_ids_file: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Reads `--prompt-ids-file`: one sequence per non-empty line (`#` starts a comment line), ids
/// separated by commas and/or whitespace; or a JSON list of lists of ids.
fn read_prompt_ids(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--prompt-ids-file {}", path.display()))?;
    let seqs: Vec<Vec<u32>> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).with_context(|| {
            format!(
                "--prompt-ids-file {}: expected a JSON list of lists of token ids",
                path.display()
            )
        })?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .enumerate()
            .map(|(i, l)| {
                l.split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|t| !t.is_empty())
                    .map(|t| t.parse::<u32>())
                    .collect::<Result<Vec<u32>, _>>()
                    .with_context(|| {
                        format!(
                            "--prompt-ids-file {}: sequence {i}: expected non-negative integer ids",
                            path.display()
                        )
                    })
            })
            .collect::<Result<_>>()?
    };
    if seqs.is_empty() || seqs.iter().any(Vec::is_empty) {
        bail!(
            "--prompt-ids-file {}: needs at least one non-empty sequence",
            path.display()
        );
    }
    Ok(seqs)
}

fn print_report(r: &BenchReport) -> Result<()> {
    outln!(
        "decode: {:.4} s/token (median, batch {}) | prefill: {:.1} tok/s | peak RSS {} (own {}) | load {:.2} s | threads {}{}",
        r.decode_s_per_token,
        r.config.batch,
        r.prefill_tokens_per_s,
        human_bytes(r.peak_memory_bytes),
        r.peak_anon_bytes.map(human_bytes).unwrap_or_else(|| "n/a".into()),
        r.load_s.unwrap_or(0.0),
        r.threads,
        r.mean_threads.map(|m| format!(" (mean {m:.1})")).unwrap_or_default()
    )?;
    let t = &r.timings;
    if t.draft_tokens > 0 {
        outln!(
            "speculation: {}/{} drafts accepted | {:.2} tokens per sweep | drafting {:.3} s vs target sweeps {:.3} s ({} sweeps)",
            t.accepted_tokens,
            t.draft_tokens,
            t.tokens_per_sweep,
            t.draft_s,
            t.sweep_s,
            t.sweeps
        )?;
    }
    outln!(
        "streamed: {} per token from {} layers ({} resident, {}) | read {}/s{} | I/O floor {:.4} s/token",
        human_bytes(r.bytes_streamed_per_token),
        r.streamed_layers,
        r.resident_layers,
        if r.in_place { "in place" } else { "split" },
        human_bytes(r.read_bytes_per_s as u64),
        if r.config.cold { " (cold)" } else { "" },
        r.io_floor_s_per_token
    )?;
    if let Some(rate) = r.expert_hit_rate {
        let cache = r.expert_cache.as_ref();
        outln!(
            "experts: routing implies {} per token, {} read | expert cache hit rate {:.1}% ({} of {} held, budget {})",
            human_bytes(r.active_bytes_per_token.unwrap_or(0)),
            human_bytes(r.bytes_streamed_per_token),
            rate * 100.0,
            human_bytes(cache.map_or(0, |c| c.used_bytes)),
            human_bytes(cache.map_or(0, |c| c.expert_bytes)),
            human_bytes(cache.map_or(0, |c| c.budget_bytes)),
        )?;
    }
    if r.profile.expert_guesses > 0 {
        let p = &r.profile;
        outln!(
            "expert guesses: {} of {} right | {} asked of the disk ahead",
            p.expert_guess_hits,
            p.expert_guesses,
            human_bytes(p.expert_guess_bytes)
        )?;
    }
    if let (Some(c), Some(f), Some(ratio)) =
        (r.compute_s_per_token, r.floor_s_per_token, r.ratio_to_floor)
    {
        outln!("compute-only (resident) {c:.4} s/token | floor max(I/O, compute) {f:.4} s/token | decode / floor = {ratio:.2}")?;
    }
    let p = &r.profile;
    outln!(
        "profile: wait {:.3} s | read {:.3} s | stage {:.3} s | compute {:.3} s | head {:.3} s | bottleneck: {}",
        p.read_wait_s,
        p.read_s,
        p.stage_s,
        p.compute_s,
        p.head_s,
        p.bottleneck()
    )?;
    Ok(())
}

/// A finite temperature above 0.
fn positive_temperature(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 => Ok(t),
        _ => Err(format!("`{s}` is not a temperature above 0")),
    }
}

/// Runs `rabbit bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let prompt_ids = a
        .prompt_ids_file
        .as_deref()
        .map(read_prompt_ids)
        .transpose()?;
    let cfg = BenchConfig {
        batch: prompt_ids.as_ref().map_or(a.batch, Vec::len),
        prompt_len: prompt_ids
            .as_ref()
            .map_or(a.prompt_len, |p| p.iter().map(Vec::len).max().unwrap_or(0)),
        new_tokens: a.new_tokens,
        repeat: a.repeat,
        cold: a.cold,
        seed: a.seed,
        prompt_ids,
        prefill_chunk: a.step.prefill_chunk(),
        speculation: a.step.speculation()?,
        temperature: a.temperature,
    };
    let (mut model, load_s) = a.model.load(a.json)?;
    a.step.load_draft(&a.model, &mut model, a.json)?;
    let limit = model
        .tokenizer()
        .map(|t| t.get_vocab_size(true) as u32)
        .unwrap_or(u32::MAX);
    let mut draft = model.take_draft();
    let mut report =
        bench::run_with_draft(&mut model.engine, draft.as_mut(), &cfg, limit).context("bench")?;
    drop(draft);
    report.load_s = Some(load_s);
    let layer_bytes: u64 = model
        .engine
        .layer_regions()
        .iter()
        .map(|r| r.bytes_read())
        .sum();
    let all_resident = report.streamed_layers == 0;
    drop(model);
    if !a.no_baseline {
        if all_resident {
            report = report
                .clone()
                .with_compute_baseline(report.decode_s_per_token);
        } else if host_available().is_some_and(|free| layer_bytes < free / 2) {
            let mut resident = a.model.clone();
            resident.resident_layers = Some(usize::MAX);
            resident.device_memory_budget = None;
            let (mut m, _) = resident.load(true)?;
            let base = bench::run(
                &mut m.engine,
                // The compute of one plain decode sweep: no drafts (speculation's gain is then
                // visible against the floor).
                &BenchConfig {
                    cold: false,
                    speculation: Default::default(),
                    ..cfg.clone()
                },
                limit,
            )
            .context("compute-only baseline")?;
            report = report.with_compute_baseline(base.decode_s_per_token);
        } else if !a.json {
            note!(
                "compute-only baseline skipped: the layers ({}) do not fit in half of free memory",
                human_bytes(layer_bytes)
            );
        }
    }
    if a.json {
        outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        print_report(&report)?;
    }
    Ok(())
}

/// Arguments of `rabbit info`.
#[derive(Args)]
pub struct InfoArgs {
    /// Without `--model` (main.rs makes it optional here): the supported model families.
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// `rabbit info` without a model: what it can run.
fn families(json_out: bool) -> Result<()> {
    let all = rabbit_models::families();
    let presets = rabbit_models::synth::all_presets();
    if json_out {
        let list: Vec<_> = all
            .iter()
            .map(|f| {
                json!({
                    "architecture": f.name(),
                    "model_type": f.variant().model_type,
                    "synth_arch": f.can_synth().then(|| f.key()),
                    "presets": presets.iter().filter(|p| p.arch == f.key() || p.arch == "any")
                        .map(|p| p.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!("{}", json!({ "families": list }))?;
        return Ok(());
    }
    outln!("supported model families (config.json `architectures`):")?;
    for f in all {
        let shapes: Vec<&str> = presets
            .iter()
            .filter(|p| p.arch == f.key())
            .map(|p| p.name)
            .collect();
        let synth = if !f.can_synth() {
            "(not synthesised: another family writes the same model)".to_string()
        } else if shapes.is_empty() {
            format!("synth --arch {}", f.key())
        } else {
            format!(
                "synth --arch {} (presets: tiny, {})",
                f.key(),
                shapes.join(", ")
            )
        };
        outln!(
            "  {:<32} model_type {:<12} {synth}",
            f.name(),
            f.variant().model_type,
        )?;
    }
    outln!("run `rabbit info --model DIR|REPO` for one model")?;
    Ok(())
}

/// What a mixture of experts reads per token: its experts, its sparse layers, and the share of
/// a sparse layer's bytes one token's routing needs.
fn moe_line(spec: &rabbit_models::ModelSpec) -> Option<String> {
    let moe = spec.moe.as_ref()?;
    let sparse: Vec<usize> = (0..spec.num_layers)
        .filter(|&i| spec.is_sparse(i))
        .collect();
    let &first = sparse.first()?;
    let (dense, expert) = spec.layer_elements(first);
    let whole = dense + expert * moe.num_experts as u64;
    let active = dense + expert * moe.top_k as u64;
    let elem = match spec.storage_dtype.as_deref() {
        Some("float32") => 4,
        _ => 2,
    };
    Some(format!(
        "mixture of experts: {} experts, top {}{}, {} of {} layers sparse | a token reads {} of a sparse layer's {} ({:.1}%)",
        moe.num_experts,
        moe.top_k,
        moe.shared
            .map(|s| format!(", a shared expert of {}", s.intermediate))
            .unwrap_or_default(),
        sparse.len(),
        spec.num_layers,
        human_bytes(active * elem),
        human_bytes(whole * elem),
        100.0 * active as f64 / whole.max(1) as f64
    ))
}

/// Runs `rabbit info`.
pub fn info(a: InfoArgs) -> Result<()> {
    if a.model.model.is_empty() {
        return families(a.json);
    }
    let (model, _) = a.model.load(true)?;
    let e = &model.engine;
    let spec = e.spec();
    let plan = e.plan();
    let units = e.layer_regions();
    let per_layer = units.iter().map(|r| r.bytes_read()).max().unwrap_or(0);
    // A sample of the streamed layers is enough to measure the path's bandwidth.
    let sample: Vec<_> = plan
        .streamed_layers
        .iter()
        .take(4)
        .map(|&i| &units[i])
        .collect();
    let mode = e.read_mode();
    let (bw, floor) = if sample.is_empty() {
        (None, 0.0)
    } else {
        let (bytes, secs) = measure_regions(&sample, mode, false)?;
        let bw = bytes as f64 / secs.max(1e-9);
        (Some(bw), plan.streamed_bytes_per_sweep as f64 / bw)
    };
    // Where the layers stream from.
    let source = if e.streams_in_place() {
        "in place"
    } else {
        "split"
    };
    if a.json {
        outln!(
            "{}",
            json!({
                "architecture": spec.architecture,
                "notes": spec.notes,
                "parameters": spec.num_parameters(),
                "layers": spec.num_layers,
                "bytes_per_layer": per_layer,
                "kv_values_per_token_per_layer": spec.kv_values_per_token(),
                "moe": spec.moe,
                "mla": spec.mla,
                "plan": plan,
                "read_bytes_per_s": bw,
                "source": source,
                "source_dir": e.source_dir(),
                "io_floor_s_per_token": floor,
                "device": rabbit_core::device::device_name(e.device()),
            })
        )?;
        return Ok(());
    }
    outln!(
        "{} ({}), {} parameters",
        spec.architecture,
        model.model_dir().display(),
        spec.num_parameters()
    )?;
    for n in &spec.notes {
        outln!("note: {n}")?;
    }
    outln!(
        "{} layers of {} each | hidden {} | heads {}/{} x {} | vocab {} | context {}{}",
        spec.num_layers,
        human_bytes(per_layer),
        spec.hidden_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
        spec.vocab_size,
        spec.max_position_embeddings,
        if spec.context_limit().is_none() {
            " (not a limit: the model extends past it)"
        } else {
            ""
        }
    )?;
    match &spec.mla {
        Some(m) => outln!(
            "KV cache: {} values per token per layer (latent attention: the {}-wide latent and the {}-wide rope key, not {} heads' keys and values of {})",
            spec.kv_values_per_token(),
            m.kv_lora_rank,
            m.qk_rope_head_dim,
            spec.num_heads,
            spec.num_heads * (m.qk_head_dim() + m.v_head_dim)
        )?,
        None => outln!(
            "KV cache: {} values per token per layer",
            spec.kv_values_per_token()
        )?,
    }
    if let Some(line) = moe_line(spec) {
        outln!("{line}")?;
    }
    outln!(
        "plan on {} (budget {}{}): embedding/norm/LM head {} resident{}; {} layers resident ({}); {} streamed ({} per token){}; KV {} + activations {} reserved",
        rabbit_core::device::device_name(e.device()),
        human_bytes(plan.device_budget),
        if plan.budget_derived { ", half of free memory" } else { "" },
        human_bytes(plan.head_bytes),
        head_note(plan),
        plan.resident_layers.len(),
        human_bytes(plan.resident_layer_bytes),
        plan.streamed_layers.len(),
        human_bytes(plan.streamed_bytes_per_sweep),
        if plan.dense_resident_layers.is_empty() {
            String::new()
        } else {
            format!(
                ", {} of them with their dense parts resident ({}), reading only routed experts",
                plan.dense_resident_layers.len(),
                human_bytes(plan.dense_resident_bytes)
            )
        },
        human_bytes(plan.kv_bytes),
        human_bytes(plan.activation_bytes)
    )?;
    outln!(
        "layers stream from: {source} ({})",
        e.source_dir().display()
    )?;
    match bw {
        Some(bw) => outln!(
            "measured read bandwidth {}/s -> I/O floor {:.4} s/token",
            human_bytes(bw as u64),
            floor
        )?,
        None => outln!("nothing streams: no I/O floor")?,
    }
    Ok(())
}
