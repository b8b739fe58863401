//! The routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, `/metrics`.
//! A request is checked here, tokenized and admitted by the engine thread, then answered from
//! its events, whole or as server-sent events kept alive by comments while a first token takes
//! its time. A client that leaves cancels its sequences (the stream's guard).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crossbeam_channel::Sender;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, Endpoint};
use crate::error::ApiError;
use crate::respond::{Choice, Meta};
use crate::state::{Phase, Shared};
use crate::worker::{Command, Event, JobId};

/// What the HTTP side needs.
pub struct HttpConfig {
    /// The id clients name in `model`.
    pub model_id: String,
    /// Bearer token required on `/v1/*`, when set.
    pub api_key: Option<String>,
    /// Interval of the SSE comments that keep a waiting stream alive.
    pub keepalive: Duration,
    /// Choices a request may ask for at most.
    pub max_n: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// When the server started (the model's `created`).
    pub started: u64,
}

/// Shared by the handlers.
#[derive(Clone)]
pub struct App {
    /// Phase and metrics.
    pub shared: Arc<Shared>,
    /// To the engine thread.
    pub commands: Sender<Command>,
    /// Settings.
    pub cfg: Arc<HttpConfig>,
}

/// The router.
pub fn router(app: App) -> Router {
    let limit = app.cfg.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid(None, "no such route (see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)")
            }
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.cfg.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110).
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .map(str::trim);
    match given {
        None => Err(ApiError::unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' (rabbit serve --api-key)",
        )),
        // Compared in full, whatever the first difference, so timing does not tell it.
        Some(g)
            if g.len() == key.len()
                && g.bytes()
                    .zip(key.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0 =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::unauthorized("incorrect API key provided")),
    }
}

fn ready(app: &App) -> Result<crate::state::Ready, ApiError> {
    match app.shared.phase() {
        Phase::Ready(r) => Ok(r),
        Phase::Loading => Err(ApiError::unavailable(
            "the model is still loading: retry shortly (GET /health says 200 once it is ready)",
        )),
        Phase::Failed(e) => Err(ApiError::unavailable(format!(
            "the model is not available: {e}"
        ))),
    }
}

async fn models(State(app): State<App>, headers: HeaderMap) -> Response {
    let r = authorize(&app, &headers)
        .map(|()| Json(json!({"object": "list", "data": [model_card(&app)]})).into_response());
    answer(&app, "models", r)
}

async fn model(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let r = authorize(&app, &headers).and_then(|()| {
        if id == app.cfg.model_id {
            Ok(Json(model_card(&app)).into_response())
        } else {
            Err(ApiError::unknown_model(&id, &app.cfg.model_id))
        }
    });
    answer(&app, "models", r)
}

fn model_card(app: &App) -> Value {
    json!({"id": app.cfg.model_id, "object": "model", "created": app.cfg.started, "owned_by": "rabbitllm"})
}

async fn health(State(app): State<App>) -> Response {
    match app.shared.phase() {
        Phase::Ready(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Phase::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
        Phase::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": e})),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.shared.metrics.render(),
    )
        .into_response()
}

fn answer(app: &App, endpoint: &'static str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(|e| {
        tracing::info!("{endpoint}: {} {}", e.status.as_u16(), e.message);
        e.into_response()
    });
    app.shared
        .metrics
        .count_request(endpoint, resp.status().as_u16());
    resp
}

async fn chat(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate(&app, Endpoint::Chat, &headers, body).await;
    answer(&app, "chat_completions", r)
}

async fn completions(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate(&app, Endpoint::Completions, &headers, body).await;
    answer(&app, "completions", r)
}

/// Cancels a request's sequences when dropped: the client left, or the answer is complete
/// (then there is nothing left to cancel).
struct CancelGuard {
    job: JobId,
    commands: Sender<Command>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel(self.job));
    }
}

async fn generate(
    app: &App,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    authorize(app, headers)?;
    let ready = ready(app)?;
    let bytes = body.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::invalid(None, format!("the request body could not be read: {e}"))
    })?;
    let g = api::parse(endpoint, &bytes, app.cfg.max_n)?;
    if g.model != app.cfg.model_id {
        return Err(ApiError::unknown_model(&g.model, &app.cfg.model_id));
    }
    if endpoint == Endpoint::Chat && !ready.chat {
        return Err(ApiError::invalid(
            Some("messages".into()),
            "this model has no chat template (tokenizer_config.json): use /v1/completions",
        ));
    }
    let (events_tx, events) = mpsc::unbounded_channel();
    let (reply_tx, reply) = oneshot::channel();
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            match endpoint {
                Endpoint::Chat => "chatcmpl",
                Endpoint::Completions => "cmpl",
            },
            rand::random::<u64>()
        ),
        created: unix_now(),
        model: app.cfg.model_id.clone(),
        endpoint,
    };
    let shape = Shape {
        choices: g.prompts.len() * g.n,
        n: g.n,
        logprobs: g.logprobs.is_some(),
        include_usage: g.include_usage,
    };
    let stream = g.stream;
    app.commands
        .send(Command::Submit(Box::new(g), events_tx, reply_tx))
        .map_err(|_| ApiError::unavailable("the engine has stopped"))?;
    let accepted = reply
        .await
        .map_err(|_| ApiError::unavailable("the engine has stopped"))??;
    app.shared.metrics.add_prompt_tokens(accepted.prompt_tokens);
    let guard = CancelGuard {
        job: accepted.job,
        commands: app.commands.clone(),
    };
    let run = Run {
        meta,
        shape,
        events,
        prompt_tokens: accepted.prompt_tokens,
        echoes: accepted.echoes,
        arrived,
        first: true,
        shared: app.shared.clone(),
        ttft: None,
        _guard: guard,
    };
    if stream {
        Ok(run.stream(app.cfg.keepalive).into_response())
    } else {
        run.collect().await
    }
}

#[derive(Clone, Copy)]
struct Shape {
    choices: usize,
    n: usize,
    logprobs: bool,
    include_usage: bool,
}

/// One admitted request's answer in the making.
struct Run {
    meta: Meta,
    shape: Shape,
    events: mpsc::UnboundedReceiver<Event>,
    prompt_tokens: usize,
    echoes: Vec<String>,
    arrived: Instant,
    first: bool,
    shared: Arc<Shared>,
    ttft: Option<f64>,
    _guard: CancelGuard,
}

impl Run {
    /// The access log line of a request that ran.
    fn log(&self, completion: usize, how: &str) {
        tracing::info!(
            "{} {how}: {} prompt + {completion} completion tokens, first token {:.2} s, {:.2} s in all",
            self.meta.id,
            self.prompt_tokens,
            self.ttft.unwrap_or(f64::NAN),
            self.arrived.elapsed().as_secs_f64()
        );
    }

    fn first_token(&mut self) {
        if std::mem::take(&mut self.first) {
            let t = self.arrived.elapsed().as_secs_f64();
            self.ttft = Some(t);
            self.shared.metrics.record_ttft(t);
        }
    }

    async fn collect(mut self) -> Result<Response, ApiError> {
        let mut choices = vec![Choice::default(); self.shape.choices];
        let mut open = self.shape.choices;
        while open > 0 {
            match self.events.recv().await {
                Some(Event::Delta {
                    choice,
                    text,
                    logprobs,
                }) => {
                    self.first_token();
                    let c = &mut choices[choice];
                    c.text.push_str(&text);
                    c.logprobs.extend(logprobs);
                }
                Some(Event::Done {
                    choice,
                    reason,
                    completion_tokens,
                }) => {
                    choices[choice].finish = Some(reason);
                    choices[choice].tokens = completion_tokens;
                    open -= 1;
                }
                Some(Event::Failed(e)) => {
                    return Err(ApiError::internal(format!("generation failed: {e}")))
                }
                None => {
                    return Err(ApiError::internal(
                        "the engine stopped before the answer was complete",
                    ))
                }
            }
        }
        self.log(choices.iter().map(|c| c.tokens).sum(), "answered");
        let body = self.meta.response(
            &choices,
            &self.echoes,
            self.shape.n,
            self.prompt_tokens,
            self.shape.logprobs,
        );
        Ok(Json(body).into_response())
    }

    fn stream(self, keepalive: Duration) -> impl IntoResponse {
        let mut queue = VecDeque::new();
        let data = |v: &Value| SseEvent::default().data(v.to_string());
        for i in 0..self.shape.choices {
            match self.meta.endpoint {
                Endpoint::Chat => {
                    queue.push_back(data(&self.meta.role_chunk(i, self.shape.include_usage)))
                }
                Endpoint::Completions => {
                    // The echoed prompt is the choice's first text.
                    if let Some(e) = self.echoes.get(i / self.shape.n.max(1)) {
                        queue.push_back(data(&self.meta.delta_chunk(
                            i,
                            e,
                            None,
                            0,
                            self.shape.include_usage,
                        )));
                    }
                }
            }
        }
        let offsets: Vec<usize> = (0..self.shape.choices)
            .map(|i| {
                self.echoes
                    .get(i / self.shape.n.max(1))
                    .map_or(0, String::len)
            })
            .collect();
        let state = StreamState {
            open: self.shape.choices,
            completion: 0,
            offsets,
            queue,
            done: false,
            run: self,
        };
        let events = futures_util::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(e) = s.queue.pop_front() {
                    return Some((Ok::<_, Infallible>(e), s));
                }
                if s.done {
                    return None;
                }
                s.advance().await;
            }
        });
        Sse::new(events).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
    }
}

struct StreamState {
    run: Run,
    open: usize,
    completion: usize,
    offsets: Vec<usize>,
    queue: VecDeque<SseEvent>,
    done: bool,
}

impl StreamState {
    /// Turns the next engine event into chunks.
    async fn advance(&mut self) {
        let data = |v: &Value| SseEvent::default().data(v.to_string());
        let (meta, usage) = (&self.run.meta, self.run.shape.include_usage);
        let end = match self.run.events.recv().await {
            Some(Event::Delta {
                choice,
                text,
                logprobs,
            }) => {
                self.run.first_token();
                let meta = &self.run.meta;
                let lps = self.run.shape.logprobs.then_some(logprobs.as_slice());
                if !text.is_empty() || lps.is_some_and(|l| !l.is_empty()) {
                    self.queue.push_back(data(&meta.delta_chunk(
                        choice,
                        &text,
                        lps,
                        self.offsets[choice],
                        usage,
                    )));
                }
                self.offsets[choice] += logprobs.iter().map(|t| t.token.len()).sum::<usize>();
                false
            }
            Some(Event::Done {
                choice,
                reason,
                completion_tokens,
            }) => {
                self.queue
                    .push_back(data(&meta.finish_chunk(choice, reason, usage)));
                self.completion += completion_tokens;
                self.open -= 1;
                self.open == 0
            }
            Some(Event::Failed(e)) => {
                let err = ApiError::internal(format!("generation failed: {e}"));
                self.queue.push_back(data(&err.body()));
                true
            }
            None => {
                let err = ApiError::internal("the engine stopped before the answer was complete");
                self.queue.push_back(data(&err.body()));
                true
            }
        };
        if end {
            if usage && self.open == 0 {
                let u = self
                    .run
                    .meta
                    .usage_chunk(self.run.prompt_tokens, self.completion);
                self.queue.push_back(data(&u));
            }
            self.queue.push_back(SseEvent::default().data("[DONE]"));
            self.done = true;
            self.run.log(self.completion, "streamed");
        }
    }
}
