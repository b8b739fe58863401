//! `rabbit`: run, split and benchmark layer-streamed language models from the command line.

mod out;

mod bench;
mod chat;
mod generate;
mod load;
mod report;
mod serve;
mod speculate;
mod split;
mod synth;
mod util;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Run language models far larger than device memory by streaming one decoder layer at a time.
#[derive(Parser)]
#[command(name = "rabbit", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic HF-format checkpoint (seeded random weights + a real tokenizer).
    Synth(synth::SynthArgs),
    /// Split a checkpoint into aligned per-layer files, or verify a split (optional: models
    /// stream in place from their own files unless compression or --split asks for a split).
    Split(split::SplitArgs),
    /// Generate tokens from a prompt or token ids.
    Generate(generate::GenerateArgs),
    /// Measure decode/prefill speed, memory and the distance to the I/O and compute floor.
    Bench(bench::BenchArgs),
    /// Show a model's shape, the residency plan and the I/O floor on this machine; without
    /// --model, the supported model families.
    Info(bench::InfoArgs),
    /// Interactive multi-turn chat with the model's chat template.
    Chat(chat::ChatArgs),
    /// Print the prompt a chat template renders for a JSON list of messages.
    Template(chat::TemplateArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming),
    /// every request in flight decoded in the same sweeps.
    Serve(serve::ServeArgs),
}

/// Parses the command line. Numbers may be negative on the command line so that `--top-k -1`
/// is answered "invalid value '-1' for '--top-k'" rather than "unexpected argument '-1'".
fn parse_cli() -> Cli {
    let mut cmd = Cli::command().allow_negative_numbers(true);
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, |s| s.allow_negative_numbers(true));
    }
    // `rabbit info` alone lists the supported families: there, `--model` may be left out.
    cmd = cmd.mut_subcommand("info", |s| {
        s.mut_arg("model", |a| {
            a.required(false)
                .default_value("")
                .hide_default_value(true)
                .help("Model directory (HF checkpoint) or hub repo id; without it, the supported model families")
        })
    });
    let matches = cmd.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() {
    let cli = parse_cli();
    // A server says what it answered (one line per request); the other commands only warn.
    util::init_tracing(match cli.command {
        Command::Serve(_) => "warn,rabbit_server=info",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Synth(a) => synth::run(a),
        Command::Split(a) => split::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Info(a) => bench::info(a),
        Command::Chat(a) => chat::chat(a),
        Command::Template(a) => chat::template(a),
        Command::Serve(a) => serve::run(a),
    };
    if let Err(e) = result {
        if e.downcast_ref::<out::StdoutError>()
            .is_some_and(out::StdoutError::is_closed_pipe)
        {
            // `rabbit generate ... | head`: the reader has what it wanted.
            std::process::exit(0);
        }
        out::note!("error: {}", out::error_chain(&e));
        std::process::exit(1);
    }
}
