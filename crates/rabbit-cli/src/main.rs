//! `rabbit`: run, split and benchmark layer-streamed language models from the command line.

mod bench;
mod chat;
mod generate;
mod split;
mod synth;
mod util;

use clap::{Parser, Subcommand};

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
    /// Split a checkpoint into aligned per-layer files, or verify a split.
    Split(split::SplitArgs),
    /// Generate tokens from a prompt or token ids.
    Generate(generate::GenerateArgs),
    /// Measure decode/prefill speed, memory and the distance to the I/O and compute floor.
    Bench(bench::BenchArgs),
    /// Show a model's shape, the residency plan and the I/O floor on this machine.
    Info(bench::InfoArgs),
    /// Interactive multi-turn chat with the model's chat template.
    Chat(chat::ChatArgs),
    /// Print the prompt a chat template renders for a JSON list of messages.
    Template(chat::TemplateArgs),
}

fn main() {
    util::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Synth(a) => synth::run(a),
        Command::Split(a) => split::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Info(a) => bench::info(a),
        Command::Chat(a) => chat::chat(a),
        Command::Template(a) => chat::template(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
