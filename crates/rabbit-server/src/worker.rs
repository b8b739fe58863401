//! The engine thread: it owns the model and one [`Scheduler`], takes requests and
//! cancellations between sweeps, and runs a sweep whenever a sequence is live. Every sweep
//! carries every live sequence (continuous batching): a request admitted now rides along with
//! the others' decode steps from the next sweep on, and one that finished or whose client left
//! gives its row up at once.
//!
//! Tokenizing and chat rendering happen here too, between sweeps (they take milliseconds
//! against a sweep's hundreds); what each request goes through is in [`crate::work`].

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rabbit_core::{Scheduler, SchedulerOptions, Speculation};
use rabbitllm::Model;
use tokio::sync::{mpsc, oneshot};

use crate::api::Generation;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::state::{Ready, Shared};
use crate::work::{Serving, Work};

/// A request's handle in the engine thread.
pub type JobId = u64;

/// One token's log-probabilities, as text.
#[derive(Debug, Clone)]
pub struct TokenLp {
    /// The token's text.
    pub token: String,
    /// The bytes it stands for.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at its position: text, bytes, log-probability.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What the engine thread tells a request.
#[derive(Debug)]
pub enum Event {
    /// New text of a choice (possibly empty while a stop string may be forming) and the
    /// log-probabilities of the tokens that made it, when asked for.
    Delta {
        /// Choice index.
        choice: usize,
        /// Text to append.
        text: String,
        /// Per token, when asked for.
        logprobs: Vec<TokenLp>,
    },
    /// A choice ended.
    Done {
        /// Choice index.
        choice: usize,
        /// OpenAI's finish reason: `stop`, `length` or `abort` (server shutdown).
        reason: &'static str,
        /// Tokens it generated.
        completion_tokens: usize,
    },
    /// The engine failed; the request ends.
    Failed(String),
}

/// A request, admitted or not.
pub struct Accepted {
    /// For cancelling.
    pub job: JobId,
    /// Prompt tokens over all prompts (each counted once, whatever `n`).
    pub prompt_tokens: usize,
    /// The prompts' texts (completions with `echo`), in prompt order.
    pub echoes: Vec<String>,
}

/// Commands to the engine thread.
pub enum Command {
    /// Run a request; the answer says whether it was admitted.
    Submit(
        Box<Generation>,
        mpsc::UnboundedSender<Event>,
        oneshot::Sender<Result<Accepted, ApiError>>,
    ),
    /// The client left: stop its sequences.
    Cancel(JobId),
    /// Stop taking requests; finish the running ones within `grace`, then end them.
    Shutdown(Duration),
}

/// Limits of the engine thread.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Live sequences at most.
    pub max_batch: usize,
    /// Waiting sequences at most (beyond: 429).
    pub max_queue: usize,
    /// Positions per sequence (prompt + completion).
    pub context: usize,
    /// Prompt tokens per sweep at most, per sequence.
    pub prefill_chunk: Option<usize>,
    /// Speculative decoding.
    pub speculation: Speculation,
}

/// Runs the engine thread until shutdown: loads the model with `load`, then serves.
pub fn run(
    load: Box<dyn FnOnce() -> Result<Model, String> + Send>,
    opts: WorkerOptions,
    shared: std::sync::Arc<Shared>,
    commands: Receiver<Command>,
) {
    // A panic here is a bug; the server must then say it is down, not answer 200 on /health
    // with nobody behind it.
    let run = std::panic::AssertUnwindSafe(|| run_inner(load, &opts, &shared, &commands));
    if std::panic::catch_unwind(run).is_err() {
        shared
            .set_failed("the engine thread panicked (a bug in rabbitllm: please report it)".into());
    }
}

fn run_inner(
    load: Box<dyn FnOnce() -> Result<Model, String> + Send>,
    opts: &WorkerOptions,
    shared: &Shared,
    commands: &Receiver<Command>,
) {
    let mut model = match load() {
        Ok(m) => m,
        Err(e) => {
            shared.set_failed(e);
            return;
        }
    };
    if let Err(e) = serve(&mut model, opts, shared, commands) {
        shared.set_failed(e);
    }
}

fn serve(
    model: &mut Model,
    opts: &WorkerOptions,
    shared: &Shared,
    commands: &Receiver<Command>,
) -> Result<(), String> {
    let spec = model.engine.spec().clone();
    let context = spec
        .context_limit()
        .map_or(opts.context, |l| l.min(opts.context))
        .max(1);
    let codec = model
        .require_codec()
        .map_err(|e| format!("rabbit serve needs text in and out: {e}"))?
        .clone();
    // Built-in formats that keep room for the answer (Baichuan 2) get it per request.
    let format = match model.chat_format(0) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("no chat format, /v1/chat/completions refused: {e}");
            None
        }
    };
    let chat_stops = format
        .as_ref()
        .map_or_else(|| spec.eos_token_ids.clone(), |f| model.chat_stop_ids(f));
    let mut draft = model.take_draft();
    let sched_opts = SchedulerOptions {
        max_batch: opts.max_batch,
        capacity: context,
        prefill_chunk: opts.prefill_chunk,
        speculation: opts.speculation.clone(),
    };
    let new_sched = |engine: &rabbit_core::Engine, draft: Option<&rabbit_core::Engine>| {
        Scheduler::new(engine, draft, sched_opts.clone()).map_err(|e| e.to_string())
    };
    let mut sched = new_sched(&model.engine, draft.as_ref())?;
    let metrics: &Metrics = &shared.metrics;
    metrics.set_kv_bytes(sched.kv_bytes(&model.engine, draft.as_ref()));
    metrics.set_capacity((opts.max_batch * context) as u64);
    shared.set_ready(Ready {
        context,
        chat: format.is_some(),
    });
    tracing::info!(
        "ready: {} positions per sequence, {} rows",
        context,
        opts.max_batch
    );

    let mut w = Work::new(Serving {
        codec: &codec,
        format,
        chat_stops,
        eos: spec.eos_token_ids.clone(),
        context,
        opts,
    });
    let mut deadline: Option<Instant> = None;
    let mut stopping = false;
    loop {
        // Idle: wait for a command; busy: take what has arrived and sweep.
        let first = if sched.is_idle() {
            if stopping {
                return Ok(());
            }
            match commands.recv_timeout(Duration::from_millis(500)) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        } else {
            None
        };
        for cmd in first.into_iter().chain(commands.try_iter()) {
            match cmd {
                Command::Submit(g, events, reply) => {
                    let answer = if stopping {
                        Err(ApiError::unavailable("the server is shutting down"))
                    } else {
                        w.submit(model, &mut sched, *g, events)
                    };
                    // A client that left while its request was being admitted.
                    if let Err(Ok(a)) = reply.send(answer) {
                        w.cancel(&mut sched, a.job);
                    }
                }
                Command::Cancel(job) => w.cancel(&mut sched, job),
                Command::Shutdown(grace) => {
                    stopping = true;
                    let at = Instant::now() + grace;
                    deadline = Some(deadline.map_or(at, |d| d.min(at)));
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let ids: Vec<JobId> = w.jobs.keys().copied().collect();
            for job in ids {
                w.cancel(&mut sched, job);
            }
        }
        // Clients that left while their sequences wait or prefill: nothing more for them.
        let gone: Vec<JobId> = w
            .jobs
            .iter()
            .filter(|(_, j)| j.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for job in gone {
            w.cancel(&mut sched, job);
        }
        if sched.is_idle() {
            continue;
        }
        let bytes_before = model.engine.profile.bytes_streamed;
        let result = sched.step(&mut model.engine, draft.as_mut(), &mut |ev| w.on_token(ev));
        match result {
            Ok(mut report) => {
                for f in std::mem::take(&mut report.finished) {
                    w.finish(
                        f.id,
                        f.output.finish_reason,
                        &f.output.output_ids,
                        f.error.as_ref(),
                    );
                }
                metrics.record_step(
                    &report,
                    model
                        .engine
                        .profile
                        .bytes_streamed
                        .saturating_sub(bytes_before),
                );
                metrics.set_occupancy(
                    sched.live(),
                    sched.waiting(),
                    sched.cached_positions() as u64,
                );
            }
            Err(e) => {
                // The scheduler's state is unknown after a failed sweep: every request in it
                // ends with the error, and a new scheduler serves the next ones.
                tracing::error!("sweep failed: {e}");
                for (_, j) in w.jobs.drain() {
                    let _ = j.events.send(Event::Failed(e.to_string()));
                }
                w.seqs.clear();
                // The old KV cache goes before the new one is allocated: both would not fit.
                drop(sched);
                sched = new_sched(&model.engine, draft.as_ref())?;
                metrics.record_failure();
                metrics.set_occupancy(0, 0, 0);
            }
        }
    }
}
