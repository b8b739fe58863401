//! Small helpers shared by the subcommands.

use std::io::IsTerminal;

/// Logs go to stderr through `tracing`, filtered by RUST_LOG (default: `default`, e.g. warnings
/// only).
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Whether progress lines should be shown (stderr is a terminal and JSON output is off).
pub fn show_progress(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {pos}/{len} {elapsed_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The intra-op thread policy, the count in use and the mean count sweeps ran with, for JSON
/// reports (`null` before a model was loaded).
pub fn threads_json() -> serde_json::Value {
    match rabbit_core::threads::report() {
        Some((policy, current, mean)) => serde_json::json!({
            "policy": policy.to_string(),
            "current": current,
            "mean": mean,
        }),
        None => serde_json::Value::Null,
    }
}
