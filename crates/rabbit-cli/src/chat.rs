//! `rabbit chat` (interactive multi-turn REPL) and `rabbit template` (render a chat template).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rabbit_core::{Control, GenerateRequest, SamplingParams};
use rabbit_models::chat::{load_messages, ChatFormat, Message};
use rabbitllm::Model;

use crate::load::ModelArgs;
use crate::out::{self, note, note_inline, outln, StdoutError};
use crate::speculate::StepArgs;

/// The model's chat format (its template, or its family's built-in one), or a clear error.
pub fn format_of(dir: &Path) -> Result<ChatFormat> {
    rabbitllm::chat::format_of(dir).map_err(no_chat_hint)
}

/// The format of a loaded model ([`Model::chat_format`]), or a clear error.
pub fn model_format(model: &Model, max_new_tokens: usize) -> Result<ChatFormat> {
    model.chat_format(max_new_tokens).map_err(no_chat_hint)
}

/// A model without a chat format can still run plain prompts: say so.
fn no_chat_hint(e: rabbitllm::Error) -> anyhow::Error {
    match e {
        rabbitllm::Error::InvalidInput(m) => anyhow::anyhow!("{m} (use --prompt without --chat)"),
        e => e.into(),
    }
}

/// Arguments of `rabbit template`.
#[derive(Args)]
pub struct TemplateArgs {
    /// Model directory (or hub repo id): its tokenizer_config.json's chat_template, or the
    /// built-in prompt format of its family (QWen v1, ChatGLM2/3, Baichuan 2).
    #[arg(long)]
    model: String,
    /// JSON file: an array of {"role", "content"} objects.
    #[arg(long, value_name = "FILE.json")]
    messages: PathBuf,
    /// Do not append the assistant turn opener (add_generation_prompt = false).
    #[arg(long)]
    no_generation_prompt: bool,
    /// Hugging Face token (else HF_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// Hub revision.
    #[arg(long)]
    revision: Option<String>,
}

/// Runs `rabbit template`: prints exactly the rendered prompt, nothing else.
pub fn template(a: TemplateArgs) -> Result<()> {
    let hub = rabbitllm::hub::HubOptions {
        token: a.token,
        revision: a.revision,
        // A template needs the tokenizer config, not gigabytes of weights.
        skip_weights: true,
        progress: crate::util::show_progress(false),
        ..Default::default()
    };
    let loc = rabbitllm::hub::locate(&a.model, &hub)?;
    let format = format_of(&loc.dir)?;
    let messages = load_messages(&a.messages)?;
    let text = match format {
        ChatFormat::Template(t) => t.render(&messages, !a.no_generation_prompt)?,
        ChatFormat::Builtin(f) => {
            // A built-in format is token-level: it needs the tokenizer to spell its prompt.
            let mut tok = rabbitllm::text::load_tokenizer(&loc.dir)?.with_context(|| {
                format!(
                    "{}: the {} chat format needs the model's tokenizer, and there is none",
                    loc.dir.display(),
                    f.name()
                )
            })?;
            tok.set_encode_special_tokens(true);
            f.render_text(&messages, !a.no_generation_prompt, &tok)?
        }
    };
    out::write(&text)?;
    Ok(())
}

/// Arguments of `rabbit chat`.
#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    step: StepArgs,
    /// System prompt for the conversation.
    #[arg(long, allow_hyphen_values = true)]
    system: Option<String>,
    /// Upper bound of tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalise tokens already present (> 1).
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const HELP: &str = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit; //text sends /text; Ctrl-C stops an answer";

/// Runs `rabbit chat`.
pub fn chat(a: ChatArgs) -> Result<()> {
    // Before loading: a bad flag should not cost a split or a model load.
    sampling_of(&a).validate()?;
    a.step.speculation()?;
    let (mut model, _) = a.model.load(false)?;
    a.step.load_draft(&a.model, &mut model, false)?;
    // Also refuses a model without a tokenizer (the context bound needs one).
    let format = model_format(&model, a.max_new_tokens)?;
    refuse_system(&format, a.system.is_some(), "--system")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C while answering stops the answer; at the prompt it does the same (nothing to stop),
    // so the program itself ends only with /exit or end of input.
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let mut system = a.system.clone();
    let mut history: Vec<Message> = Vec::new();
    note!("{HELP}");
    let stdin = std::io::stdin();
    let mut raw = Vec::new();
    loop {
        note_inline!("> ");
        raw.clear();
        if stdin.lock().read_until(b'\n', &mut raw)? == 0 {
            note!();
            return Ok(());
        }
        // Bytes that are not UTF-8 (a paste in another encoding) must not end the session.
        let line = String::from_utf8_lossy(&raw);
        let input = line.trim_end_matches(['\n', '\r']);
        match input.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.clear();
                note!("(conversation reset)");
                continue;
            }
            "/help" => {
                note!("{HELP}");
                continue;
            }
            _ => {}
        }
        let command = input.trim();
        let system_arg = command
            .strip_prefix("/system")
            .filter(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if let Some(rest) = system_arg {
            let text = rest.trim();
            if !text.is_empty() {
                if let Err(e) = refuse_system(&format, true, "/system") {
                    note!("error: {e}");
                    continue;
                }
            }
            system = (!text.is_empty()).then(|| text.to_string());
            history.clear();
            note!(
                "(system prompt {}; conversation reset)",
                if system.is_some() { "set" } else { "cleared" }
            );
            continue;
        }
        // `//text` sends `/text` as a message.
        let content = match command.strip_prefix("//") {
            Some(_) => input.trim_start().replacen("//", "/", 1),
            None if command.starts_with('/') => {
                note!("unknown command `{command}` (start with // to send a message beginning with /); {HELP}");
                continue;
            }
            None => input.to_string(),
        };
        history.push(Message {
            role: "user".into(),
            content,
        });
        stop.store(false, Ordering::SeqCst);
        match answer(&mut model, &format, system.as_deref(), &history, &a, &stop) {
            Ok(text) => history.push(Message {
                role: "assistant".into(),
                // What the family's chat() keeps of a reply (stripped; ChatGLM3's metadata
                // line dropped).
                content: match &format {
                    ChatFormat::Builtin(f) => f.reply_for_history(&text),
                    ChatFormat::Template(_) => text,
                },
            }),
            // Nobody reads the answers any more: end the session.
            Err(e) if e.downcast_ref::<StdoutError>().is_some() => return Err(e),
            Err(e) => {
                history.pop();
                note!("error: {}", out::error_chain(&e));
            }
        }
    }
}

/// A system prompt (from `what`) for a format that has none is refused up front, not at every
/// turn.
pub fn refuse_system(format: &ChatFormat, given: bool, what: &str) -> Result<()> {
    if let (ChatFormat::Builtin(f), true) = (format, given) {
        if !f.takes_system() {
            bail!(
                "{what}: the {} has no system message (this model's chat takes only user and assistant turns)",
                f.name()
            );
        }
    }
    Ok(())
}

fn sampling_of(a: &ChatArgs) -> SamplingParams {
    SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: Some(a.top_p),
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    }
}

fn answer(
    model: &mut Model,
    format: &ChatFormat,
    system: Option<&str>,
    history: &[Message],
    a: &ChatArgs,
    stop: &AtomicBool,
) -> Result<String> {
    let mut messages = Vec::with_capacity(history.len() + 1);
    if let Some(s) = system {
        messages.push(Message {
            role: "system".into(),
            content: s.to_string(),
        });
    }
    messages.extend(history.iter().cloned());
    let ids = model.encode_conversation(format, &messages, true)?;
    let spec = model.engine.spec().clone();
    let room = spec.max_position_embeddings.saturating_sub(ids.len());
    if room == 0 {
        bail!(
            "the conversation fills the context ({} tokens); /reset to start over",
            ids.len()
        );
    }
    let req = GenerateRequest {
        sequences: vec![ids],
        max_new_tokens: a.max_new_tokens.min(room),
        sampling: sampling_of(a),
        eos_token_ids: model.chat_stop_ids(format),
        keep_logits: false,
        prefill_chunk: a.step.prefill_chunk(),
        speculation: a.step.speculation()?,
    };
    let codec = model.require_codec()?.clone();
    let mut stream = codec.stream();
    let start = Instant::now();
    let mut write_err: Option<StdoutError> = None;
    let out = model.generate(&req, &mut |ev| {
        if let Ok(Some(piece)) = stream.step(ev.token) {
            if let Err(e) = out::write(&piece) {
                write_err = Some(e);
                return Control::Cancel;
            }
        }
        if stop.load(Ordering::SeqCst) {
            Control::Cancel
        } else {
            Control::Continue
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    outln!()?;
    let s = &out.sequences[0];
    let n = s.output_ids.len();
    let secs = start.elapsed().as_secs_f64();
    note!(
        "[{n} tokens, {:.2} tok/s, prefill {:.2} s{}]",
        n as f64 / secs.max(1e-9),
        out.timings.prefill_s,
        if stop.load(Ordering::SeqCst) {
            ", stopped"
        } else {
            ""
        }
    );
    Ok(codec.decode(&s.output_ids)?)
}
