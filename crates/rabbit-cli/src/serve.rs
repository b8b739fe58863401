//! `rabbit serve`: the OpenAI-compatible server (crate `rabbit-server`) with every
//! model-loading option of `generate`.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use rabbit_server::{ServeOptions, WorkerOptions};

use crate::load::ModelArgs;
use crate::out::{error_chain, note};
use crate::speculate::StepArgs;

/// Arguments of `rabbit serve`.
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    step: StepArgs,
    /// Address to listen on; anything but loopback exposes the model to the network and must
    /// be asked for (use --api-key with it).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: no key).
    #[arg(long, value_name = "KEY", value_parser = non_empty)]
    api_key: Option<String>,
    /// The model id clients send in `model` (default: --model as given).
    #[arg(long, value_name = "NAME", value_parser = non_empty)]
    served_model_name: Option<String>,
    /// Sequences decoded together in every sweep (KV rows).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_batch: u64,
    /// Sequences that may wait for a row; beyond, requests get 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    max_queue: u64,
    /// Positions per sequence (prompt + completion), at most the model's context; the KV cache
    /// holds --max-batch of them and is reserved in the memory plan.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    context: u64,
    /// Seconds between the SSE comments that keep a stream alive while its first token comes.
    #[arg(long, value_name = "SECS", default_value_t = 15.0, value_parser = positive_secs)]
    keepalive: f64,
    /// On SIGINT/SIGTERM, seconds running requests may take to finish before they are ended
    /// (finish_reason "abort"); a second signal ends them at once.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = secs)]
    shutdown_grace: f64,
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

fn secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
        return Err(format!("must be in 0..=86400 seconds, got {s}"));
    }
    Ok(v)
}

fn positive_secs(s: &str) -> Result<f64, String> {
    let v = secs(s)?;
    if v < 0.05 {
        return Err(format!("must be at least 0.05 seconds, got {s}"));
    }
    Ok(v)
}

/// Runs `rabbit serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    let speculation = a.step.speculation()?;
    let addr = SocketAddr::new(a.host, a.port);
    // Bound first: a taken port fails now, not after minutes of loading.
    let listener = TcpListener::bind(addr).with_context(|| {
        format!(
            "--host {} --port {}: cannot listen on {addr}",
            a.host, a.port
        )
    })?;
    let bound = listener.local_addr().context("the listening address")?;
    if !a.host.is_loopback() && a.api_key.is_none() {
        note!("warning: listening on {bound} (not loopback) without --api-key: anyone who can reach it can use the model");
    }
    note!(
        "listening on http://{bound} (loading {}; GET /health answers 200 once ready)",
        a.model.model
    );
    let (max_batch, context) = (a.max_batch as usize, a.context as usize);
    let (margs, step, chunk) = (a.model.clone(), a.step.clone(), a.step.prefill_chunk());
    let load = Box::new(move || -> Result<rabbitllm::Model, String> {
        let (mut model, secs) = margs
            .load_for(false, max_batch, context, chunk)
            .map_err(|e| {
                format!(
                    "{} (the memory plan reserves the KV cache and activations of --max-batch \
                 {max_batch} sequences of --context {context} positions: lower either, or raise \
                 --device-memory-budget)",
                    error_chain(&e)
                )
            })?;
        // A server's prefills are not watched on a terminal.
        model.engine.on_prefill_layer = None;
        step.load_draft(&margs, &mut model, false)
            .map_err(|e| error_chain(&e))?;
        note!("loaded in {secs:.1} s; serving {}", margs.model);
        Ok(model)
    });
    let opts = ServeOptions {
        model_id: a.served_model_name.unwrap_or_else(|| a.model.model.clone()),
        api_key: a.api_key,
        keepalive: Duration::from_secs_f64(a.keepalive),
        grace: Duration::from_secs_f64(a.shutdown_grace),
        max_body_bytes: 64 << 20,
        worker: WorkerOptions {
            max_batch,
            max_queue: a.max_queue as usize,
            context,
            prefill_chunk: a.step.prefill_chunk(),
            speculation,
        },
    };
    match rabbit_server::serve_blocking(listener, opts, load) {
        Ok(()) => {
            note!("stopped");
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}
