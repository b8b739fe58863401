//! `rabbit generate`: prompts or token ids in, tokens out (streamed), with timings and memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use rabbit_core::memory::{current_rss, peak_anon, peak_rss};
use rabbit_core::{Control, GenerateRequest, SamplingParams};
use rabbit_models::chat::Message;
use serde_json::json;

use crate::load::ModelArgs;
use crate::out::{self, note, outln, StdoutError};
use crate::report::human_bytes;
use crate::speculate::StepArgs;
use crate::util::{bar, show_progress, threads_json};
use rabbitllm::text::StopHold;

/// Arguments of `rabbit generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    step: StepArgs,
    /// Text prompt (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "input_ids", allow_hyphen_values = true)]
    prompt: Option<String>,
    /// Wrap --prompt in the model's chat template (one user turn, generation prompt added).
    #[arg(long, requires = "prompt", conflicts_with = "input_ids")]
    chat: bool,
    /// System prompt for --chat.
    #[arg(long, requires = "chat", allow_hyphen_values = true)]
    system: Option<String>,
    /// Comma-separated token ids of one sequence; repeat for a batch.
    #[arg(long = "input-ids", value_name = "IDS", allow_hyphen_values = true)]
    input_ids: Vec<String>,
    /// New tokens to generate per sequence.
    #[arg(long)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Keep only the K most likely tokens when sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f64>,
    /// Penalise tokens already present (> 1).
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop a sequence when its text contains this string (repeatable).
    #[arg(long = "stop", value_parser = non_empty_stop, allow_hyphen_values = true)]
    stop: Vec<String>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Write every step's float32 logits to this safetensors file (`logits.<i>`).
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// Print per-stage and per-layer timings (read wait, read, staging, compute) and the
    /// bottleneck on stderr.
    #[arg(long)]
    profile: bool,
    /// Write the profile as JSON to this file.
    #[arg(long, value_name = "FILE")]
    profile_json: Option<PathBuf>,
}

fn non_empty_stop(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("a stop string must not be empty (it would stop before the first token)".into())
    } else {
        Ok(s.to_string())
    }
}

/// Fails early when `path` cannot be written later: its directory must exist and the path must
/// not be a directory (found out only after the whole run otherwise).
pub fn check_output_path(flag: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {}: is a directory; give a file name",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "{flag} {}: directory {} does not exist",
                path.display(),
                parent.display()
            );
        }
    }
    Ok(())
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids: Result<Vec<u32>, _> = s.split(',').map(|t| t.trim().parse::<u32>()).collect();
    match ids {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => bail!(
            "--input-ids \"{s}\": expected comma-separated non-negative integers like \"1,2,3\""
        ),
    }
}

/// Runs `rabbit generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    if a.prompt.is_none() && a.input_ids.is_empty() {
        bail!("give either --prompt TEXT or --input-ids \"1,2,3\"");
    }
    let sequences_from_ids: Vec<Vec<u32>> = a
        .input_ids
        .iter()
        .map(|s| parse_ids(s))
        .collect::<Result<_>>()?;
    if let Some(path) = &a.dump_logits {
        check_output_path("--dump-logits", path)?;
    }
    if let Some(path) = &a.profile_json {
        check_output_path("--profile-json", path)?;
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    // Before loading: a bad flag should not cost a split or a model load.
    sampling.validate()?;
    let speculation = a.step.speculation()?;
    let (mut model, load_s) = a.model.load(a.json)?;
    a.step.load_draft(&a.model, &mut model, a.json)?;
    let mut chat_format = None;
    let sequences = match &a.prompt {
        Some(p) if a.chat => {
            let format = crate::chat::model_format(&model, a.max_new_tokens)?;
            crate::chat::refuse_system(&format, a.system.is_some(), "--system")?;
            let mut messages = Vec::new();
            if let Some(s) = &a.system {
                messages.push(Message {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: p.clone(),
            });
            let ids = model.encode_conversation(&format, &messages, true)?;
            chat_format = Some(format);
            vec![ids]
        }
        Some(p) => vec![model.encode(p)?],
        None => sequences_from_ids,
    };
    let spec = model.engine.spec().clone();
    let req = GenerateRequest {
        sequences: sequences.clone(),
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: match &chat_format {
            Some(f) => model.chat_stop_ids(f),
            None => spec.eos_token_ids.clone(),
        },
        keep_logits: a.dump_logits.is_some(),
        prefill_chunk: a.step.prefill_chunk(),
        speculation,
    };
    model.engine.validate_request(&req)?;

    if !a.stop.is_empty() && model.codec().is_none() {
        bail!(
            "--stop needs the model's tokenizer.json to see text, and {} has none",
            model.model_dir().display()
        );
    }
    let stream = !a.json && sequences.len() == 1 && model.codec().is_some();
    let codec = model.codec().cloned();
    let mut streams: Vec<_> = match &codec {
        Some(c) if stream => vec![c.stream()],
        _ => vec![],
    };
    let mut generated: HashMap<usize, Vec<u32>> = HashMap::new();
    let stops = a.stop.clone();
    let mut write_err: Option<StdoutError> = None;
    let mut held = StopHold::new(stops.clone());
    let files_wanted = a.dump_logits.is_some() || a.profile_json.is_some();
    // Without text streaming to watch, a long generation gets a progress bar (terminal only).
    let gen_bar =
        (!stream && show_progress(a.json)).then(|| bar(a.max_new_tokens as u64, "generate"));
    let out = model.generate(&req, &mut |ev| {
        if let (Some(b), 0) = (&gen_bar, ev.sequence) {
            b.set_position(ev.step as u64 + 1);
        }
        if let Some(s) = streams.first_mut() {
            if let Ok(Some(piece)) = s.step(ev.token) {
                if let Err(e) = out::write(held.push(&piece)) {
                    write_err = Some(e);
                    // Nobody reads the answer any more: stop computing it, unless files were
                    // asked for, which then still get the whole run.
                    if !files_wanted {
                        return Control::Cancel;
                    }
                }
            }
        }
        if write_err.is_some() {
            streams.clear();
        }
        if stops.is_empty() {
            return Control::Continue;
        }
        let ids = generated.entry(ev.sequence).or_default();
        ids.push(ev.token);
        let Some(c) = &codec else {
            return Control::Continue;
        };
        let text = c.decode(ids).unwrap_or_default();
        if stops.iter().any(|s| text.contains(s.as_str())) {
            Control::StopSequence
        } else {
            Control::Continue
        }
    })?;
    drop(streams);
    if let Some(b) = gen_bar {
        b.finish_and_clear();
    }
    if let Some(e) = write_err {
        write_output_files(&a, &out, &model.engine.profile, spec.vocab_size)?;
        return Err(e.into());
    }
    if stream {
        out::write(held.finish())?;
        outln!()?;
    }

    let texts: Vec<Option<String>> = out
        .sequences
        .iter()
        .map(|s| {
            model.codec().map(|c| {
                let text = c.decode(&s.output_ids).unwrap_or_default();
                match stops.iter().filter_map(|st| text.find(st.as_str())).min() {
                    Some(cut) => text[..cut].to_string(),
                    None => text,
                }
            })
        })
        .collect();

    write_output_files(&a, &out, &model.engine.profile, spec.vocab_size)?;
    let prof = &model.engine.profile;
    if a.profile {
        let moe = prof.expert_loads > 0;
        note!(
            "layer  where     MiB    wait_s    read_s   stage_s compute_s{}",
            if moe { "  experts (cached)" } else { "" }
        );
        for (i, l) in prof.layers.iter().enumerate() {
            let experts = if moe && l.expert_loads > 0 {
                format!("  {:>7} ({})", l.expert_loads, l.expert_hits)
            } else {
                String::new()
            };
            note!(
                "{i:>5}  {:<8} {:>5.1} {:>9.4} {:>9.4} {:>9.4} {:>9.4}{experts}",
                if l.resident { "resident" } else { "streamed" },
                l.bytes as f64 / (1 << 20) as f64,
                l.read_wait_s,
                l.read_s,
                l.stage_s,
                l.compute_s
            );
        }
        if moe {
            note!(
                "experts: {} routed reads, {} found in the expert cache, {} read",
                prof.expert_loads,
                prof.expert_hits,
                human_bytes(prof.expert_bytes)
            );
        }
        note!(
            "total: wait {:.3} s | read {:.3} s (overlapped) | stage {:.3} s | compute {:.3} s | head {:.3} s | bottleneck: {}",
            prof.read_wait_s,
            prof.read_s,
            prof.stage_s,
            prof.compute_s,
            prof.head_s,
            prof.bottleneck()
        );
        let t = &out.timings;
        if t.draft_tokens > 0 || t.draft_s > 0.0 {
            note!(
                "speculation: drafting {:.3} s | target sweeps {:.3} s ({} sweeps, {:.3} s each) | {}/{} drafts accepted | {:.2} tokens per sweep",
                t.draft_s,
                t.sweep_s,
                t.sweeps,
                t.sweep_s / t.sweeps.max(1) as f64,
                t.accepted_tokens,
                t.draft_tokens,
                t.tokens_per_sweep
            );
        }
    }
    let t = &out.timings;
    let peak = peak_rss();
    if !a.json {
        if !stream {
            for (i, s) in out.sequences.iter().enumerate() {
                match &texts[i] {
                    Some(text) => outln!("[{i}] {text}")?,
                    None => outln!(
                        "[{i}] {}",
                        s.output_ids
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    )?,
                }
            }
        }
        note!(
            "prefill: {} tokens in {:.3} s ({:.1} tok/s) | decode: {:.4} s/token (median of {} steps) | load {:.2} s",
            t.prefill_tokens, t.prefill_s, t.prefill_tokens_per_s, t.decode_s_per_token, t.decode_steps, load_s
        );
        if t.draft_tokens > 0 {
            note!(
                "speculation: {}/{} drafts accepted ({:.0}%) | {:.2} tokens per sweep | {} sweeps",
                t.accepted_tokens,
                t.draft_tokens,
                100.0 * t.accepted_tokens as f64 / t.draft_tokens as f64,
                t.tokens_per_sweep,
                t.sweeps
            );
        }
        note!(
            "memory: peak RSS {} (own memory peak {}) | KV cache {} | resident weights {} | staging {}",
            peak.map(human_bytes).unwrap_or_else(|| "n/a".into()),
            peak_anon().map(human_bytes).unwrap_or_else(|| "n/a".into()),
            human_bytes(out.kv_cache_bytes),
            human_bytes(model.engine.resident_bytes()),
            human_bytes(model.engine.staging_bytes())
        );
    } else {
        let seqs: Vec<_> = out
            .sequences
            .iter()
            .zip(&texts)
            .map(|(s, text)| {
                json!({
                    "input_ids": s.input_ids,
                    "output_ids": s.output_ids,
                    "text": text,
                    "finish_reason": s.finish_reason,
                })
            })
            .collect();
        let obj = json!({
            "sequences": seqs,
            "timings": {
                "load_s": load_s,
                "prefill_s": t.prefill_s,
                "prefill_tokens": t.prefill_tokens,
                "prefill_tokens_per_s": t.prefill_tokens_per_s,
                "decode_s_per_token": t.decode_s_per_token,
                "decode_mean_s_per_token": t.decode_mean_s_per_token,
                "decode_steps": t.decode_steps,
                "generated_tokens": t.generated_tokens,
                "total_s": t.total_s,
                "sweeps": t.sweeps,
                "draft_tokens": t.draft_tokens,
                "accepted_tokens": t.accepted_tokens,
                "tokens_per_sweep": t.tokens_per_sweep,
                "draft_s": t.draft_s,
                "sweep_s": t.sweep_s,
            },
            "memory": {
                "peak_rss_bytes": peak,
                "rss_bytes": current_rss(),
                "peak_anon_bytes": peak_anon(),
                "kept_mapped_bytes": model.engine.kept_mapped_bytes(),
                "kv_cache_bytes": out.kv_cache_bytes,
                "resident_weight_bytes": model.engine.resident_bytes(),
                "staging_bytes": model.engine.staging_bytes(),
            },
            "profile": model.engine.profile,
            "threads": threads_json(),
            "device": rabbit_core::device::device_name(model.engine.device()),
        });
        outln!("{obj}")?;
    }
    Ok(())
}

/// `--dump-logits` and `--profile-json`, when asked for.
fn write_output_files(
    a: &GenerateArgs,
    out: &rabbit_core::GenerateOutput,
    prof: &rabbit_core::Profile,
    vocab: usize,
) -> Result<()> {
    if let Some(path) = &a.dump_logits {
        write_logits(path, &out.sequences, vocab)?;
    }
    if let Some(path) = &a.profile_json {
        rabbit_split::fsutil::write_atomic(path, &serde_json::to_vec_pretty(prof)?)
            .with_context(|| format!("--profile-json {}", path.display()))?;
    }
    Ok(())
}

fn write_logits(
    path: &std::path::Path,
    seqs: &[rabbit_core::SequenceOutput],
    vocab: usize,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes: Vec<(String, Vec<u8>, usize)> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let logits = s.logits.as_deref().unwrap_or(&[]);
            let rows = logits.len() / vocab.max(1);
            let b: Vec<u8> = logits.iter().flat_map(|f| f.to_le_bytes()).collect();
            (format!("logits.{i}"), b, rows)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, rows)| {
            Ok((
                n.clone(),
                TensorView::new(Dtype::F32, vec![*rows, vocab], b)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    // A unique temporary next to `path`, renamed over it only once complete (never `run.tmp`,
    // which may be the user's).
    let bytes = safetensors::serialize(views, None)?;
    rabbit_split::fsutil::write_atomic(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
