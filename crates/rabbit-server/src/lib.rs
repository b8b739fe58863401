//! `rabbit serve`: an OpenAI-compatible HTTP server over a layer-streamed model.
//!
//! One engine thread owns the model and a [`rabbit_core::Scheduler`]; every sweep over the
//! weights serves every request in flight (continuous batching): a new request joins at the next
//! sweep, its prompt riding along (chunked, with `--prefill-chunk`) with the others' decode
//! steps, and a finished or abandoned one leaves at once. The HTTP side (axum on tokio) parses
//! and checks requests, sends them to the engine thread and answers from its events, whole or
//! streamed as server-sent events.
//!
//! ```text
//! client ──HTTP──▶ http.rs (auth, api.rs parse) ──Command──▶ worker.rs (tokenize, Scheduler)
//!        ◀─SSE/JSON── respond.rs ◀──Event (text deltas, logprobs, done)──┘
//! ```

pub mod api;
pub mod error;
pub mod http;
pub mod metrics;
pub mod respond;
pub mod state;
pub mod work;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use rabbitllm::Model;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use worker::WorkerOptions;

/// How the server runs.
pub struct ServeOptions {
    /// The id clients name in `model` (and `/v1/models` lists).
    pub model_id: String,
    /// Bearer token required on `/v1/*`, when set.
    pub api_key: Option<String>,
    /// Interval of SSE keep-alive comments.
    pub keepalive: Duration,
    /// After SIGINT/SIGTERM, how long running requests may finish before they are ended
    /// (`finish_reason: "abort"`); a second signal ends them at once.
    pub grace: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// The engine thread's limits.
    pub worker: WorkerOptions,
}

/// Serves on `listener` until SIGINT/SIGTERM: the model is loaded by `load` on the engine
/// thread meanwhile (`/health` answers 503 until it is ready). Returns an error when loading or
/// the engine failed.
pub async fn serve(
    listener: TcpListener,
    opts: ServeOptions,
    load: Box<dyn FnOnce() -> Result<Model, String> + Send>,
) -> Result<(), String> {
    let shared = Arc::new(state::Shared::new());
    let (commands, inbox) = crossbeam_channel::unbounded();
    let engine = {
        let (shared, wopts) = (shared.clone(), opts.worker.clone());
        std::thread::Builder::new()
            .name("rabbit-engine".into())
            .spawn(move || worker::run(load, wopts, shared, inbox))
            .map_err(|e| format!("cannot start the engine thread: {e}"))?
    };
    let app = http::App {
        shared: shared.clone(),
        commands: commands.clone(),
        cfg: Arc::new(http::HttpConfig {
            model_id: opts.model_id,
            api_key: opts.api_key,
            keepalive: opts.keepalive,
            max_n: opts.worker.max_batch,
            max_body_bytes: opts.max_body_bytes,
            started: http::unix_now(),
        }),
    };
    let stop = {
        let (shared, commands, grace) = (shared.clone(), commands.clone(), opts.grace);
        async move {
            let mut phase = shared.watch();
            tokio::select! {
                _ = signal() => {
                    tracing::info!("shutting down: finishing running requests (up to {} s)", grace.as_secs_f64());
                    let _ = commands.send(worker::Command::Shutdown(grace));
                    // A second signal ends them at once.
                    tokio::spawn(async move {
                        signal().await;
                        let _ = commands.send(worker::Command::Shutdown(Duration::ZERO));
                    });
                }
                _ = async {
                    while !matches!(shared.phase(), state::Phase::Failed(_)) {
                        if phase.changed().await.is_err() {
                            break;
                        }
                    }
                } => {}
            }
        }
    };
    let served = axum::serve(listener, http::router(app))
        .with_graceful_shutdown(stop)
        .await;
    drop(commands);
    let failed = match shared.phase() {
        state::Phase::Failed(e) => Some(e),
        state::Phase::Loading => {
            // Interrupted while loading: nothing to finish.
            return served.map_err(|e| e.to_string());
        }
        state::Phase::Ready(_) => None,
    };
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    served.map_err(|e| e.to_string())?;
    match failed.or_else(|| match shared.phase() {
        state::Phase::Failed(e) => Some(e),
        _ => None,
    }) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// SIGINT or SIGTERM.
async fn signal() {
    let int = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = int.await;
                    return;
                }
            };
        tokio::select! {
            _ = int => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = int.await;
    }
}

/// [`serve`] on its own tokio runtime (two threads: the HTTP side is light, the cores belong to
/// the engine), for a listener bound beforehand (so a taken port fails before a model loads).
pub fn serve_blocking(
    listener: std::net::TcpListener,
    opts: ServeOptions,
    load: Box<dyn FnOnce() -> Result<Model, String> + Send>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rabbit-http")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    rt.block_on(async move {
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
        let listener = TcpListener::from_std(listener).map_err(|e| format!("listener: {e}"))?;
        serve(listener, opts, load).await
    })
}
