//! One request's life in the engine thread: tokenized and admitted (or refused), its tokens
//! turned into text through the stop strings and sent to the client, its end reported.

use std::collections::HashMap;

use rabbit_core::{Control, FinishReason, Scheduler, SeqId, SequenceRequest};
use rabbit_models::chat::ChatFormat;
use rabbitllm::text::{StopHold, TextCodec, TextStream};
use rabbitllm::Model;
use tokio::sync::mpsc;

use crate::api::{Generation, Prompt};
use crate::error::ApiError;
use crate::worker::{Accepted, Event, JobId, TokenLp, WorkerOptions};

pub(crate) struct SeqState<'c> {
    job: JobId,
    choice: usize,
    stream: TextStream<'c>,
    hold: StopHold,
}

pub(crate) struct JobState {
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) open: usize,
}

/// The request field a prompt came from.
fn field_of(g: &Generation, i: usize) -> String {
    match &g.prompts[i] {
        Prompt::Chat(_) => "messages".to_string(),
        _ if g.prompts.len() > 1 => format!("prompt[{i}]"),
        _ => "prompt".to_string(),
    }
}

/// What every request of a loaded model shares.
pub(crate) struct Serving<'c> {
    /// Text in and out.
    pub(crate) codec: &'c TextCodec,
    /// The chat format, when the model has one.
    pub(crate) format: Option<ChatFormat>,
    /// Ids a chat answer stops at.
    pub(crate) chat_stops: Vec<u32>,
    /// Ids a completion stops at.
    pub(crate) eos: Vec<u32>,
    /// Positions per sequence.
    pub(crate) context: usize,
    /// The limits.
    pub(crate) opts: &'c WorkerOptions,
}

/// The requests in the engine thread.
pub(crate) struct Work<'c> {
    pub(crate) serving: Serving<'c>,
    pub(crate) seqs: HashMap<SeqId, SeqState<'c>>,
    pub(crate) jobs: HashMap<JobId, JobState>,
    pub(crate) next_job: JobId,
}

impl<'c> Work<'c> {
    /// No request yet.
    pub(crate) fn new(serving: Serving<'c>) -> Work<'c> {
        Work {
            serving,
            seqs: HashMap::new(),
            jobs: HashMap::new(),
            next_job: 0,
        }
    }

    pub(crate) fn submit(
        &mut self,
        model: &Model,
        sched: &mut Scheduler,
        g: Generation,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Accepted, ApiError> {
        let Serving {
            format,
            chat_stops,
            eos,
            context,
            opts,
            ..
        } = &self.serving;
        let (format, context, opts) = (format.as_ref(), *context, *opts);
        let eos = match g.prompts[0] {
            Prompt::Chat(_) => chat_stops.clone(),
            _ => eos.clone(),
        };
        let vocab = model.engine.spec().vocab_size;
        let wanted = g.prompts.len() * g.n;
        if wanted > opts.max_batch + opts.max_queue {
            return Err(ApiError::invalid(
                Some("prompt".into()),
                format!(
                    "this request needs {wanted} sequences, more than this server ever holds \
                     (--max-batch {} + --max-queue {})",
                    opts.max_batch, opts.max_queue
                ),
            ));
        }
        let max_text = self.serving.codec.max_text_bytes(context);
        let mut encoded = Vec::with_capacity(g.prompts.len());
        for (i, p) in g.prompts.iter().enumerate() {
            let field = field_of(&g, i);
            // Text that cannot fit the context is refused before it is tokenized.
            let text_len = match p {
                Prompt::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
                Prompt::Text(t) => t.len(),
                Prompt::Ids(_) => 0,
            };
            if text_len > max_text {
                return Err(ApiError::invalid(
                    Some(field),
                    format!(
                        "{text_len} bytes of text cannot fit this server's maximum context \
                         length of {context} tokens per sequence (rabbit serve --context)"
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            let ids = match p {
                Prompt::Chat(messages) => {
                    let Some(f) = format else {
                        return Err(ApiError::invalid(
                            Some("messages".into()),
                            "this model has no chat template: use /v1/completions",
                        ));
                    };
                    if !rabbitllm::chat::takes_system(f)
                        && messages.iter().any(|m| m.role == "system")
                    {
                        return Err(ApiError::invalid(
                            Some("messages".into()),
                            "this model's chat format has no system message (user and \
                             assistant turns only)",
                        ));
                    }
                    match f {
                        ChatFormat::Builtin(b) => {
                            let room = b.clone().with_max_new_tokens(g.max_tokens.unwrap_or(0));
                            model.encode_conversation(&ChatFormat::Builtin(room), messages, true)
                        }
                        t => model.encode_conversation(t, messages, true),
                    }
                }
                Prompt::Text(t) => model.encode(t),
                Prompt::Ids(ids) => Ok(ids.clone()),
            }
            .map_err(|e| ApiError::invalid(Some(field.clone()), e.to_string()))?;
            if ids.is_empty() {
                return Err(ApiError::invalid(
                    Some(field),
                    "the prompt is empty: it encodes to no token",
                ));
            }
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(
                    Some(field),
                    format!("token id {bad} is out of range (the vocabulary has {vocab} tokens)"),
                ));
            }
            let room = context.saturating_sub(ids.len());
            let max_tokens = g.max_tokens.unwrap_or(room);
            if max_tokens == 0 || max_tokens > room {
                // The prompt alone too long, or the completion asked for.
                let what = if g.max_tokens.is_some() && room > 0 {
                    "max_tokens"
                } else {
                    field.as_str()
                };
                return Err(ApiError::invalid(
                    Some(what.to_string()),
                    format!(
                        "this server's maximum context length is {context} tokens per sequence \
                         (rabbit serve --context), but {} were asked for ({} in the prompt, {} \
                         for the completion)",
                        ids.len() + max_tokens.max(1),
                        ids.len(),
                        max_tokens.max(1)
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            encoded.push((ids, max_tokens));
        }
        let (live, waiting) = (sched.live(), sched.waiting());
        if live + waiting + wanted > opts.max_batch + opts.max_queue {
            return Err(ApiError::busy(
                format!(
                    "the server is full: {live} sequences running and {waiting} waiting \
                     (--max-batch {}, --max-queue {}); this request needs {wanted}",
                    opts.max_batch, opts.max_queue
                ),
                1,
            ));
        }
        let job = self.next_job;
        self.next_job += 1;
        let base_seed = g.seed.unwrap_or_else(rand::random);
        let mut prompt_tokens = 0;
        let mut echoes = Vec::new();
        for (p, (ids, max_tokens)) in encoded.into_iter().enumerate() {
            prompt_tokens += ids.len();
            if g.echo {
                echoes.push(match &g.prompts[p] {
                    Prompt::Text(t) => t.clone(),
                    _ => self.serving.codec.decode(&ids).unwrap_or_default(),
                });
            }
            for c in 0..g.n {
                let choice = p * g.n + c;
                let mut sampling = g.sampling.clone();
                sampling.seed = base_seed.wrapping_add(choice as u64);
                let req = SequenceRequest {
                    prompt: ids.clone(),
                    max_new_tokens: max_tokens,
                    sampling,
                    eos_token_ids: if g.ignore_eos { vec![] } else { eos.clone() },
                    keep_logits: false,
                    logprobs: g.logprobs,
                };
                let id = match sched.add(&model.engine, req) {
                    Ok(id) => id,
                    Err(e) => {
                        // Nothing of a refused request keeps running.
                        self.jobs.insert(
                            job,
                            JobState {
                                events: events.clone(),
                                open: 0,
                            },
                        );
                        self.cancel(sched, job);
                        self.jobs.remove(&job);
                        return Err(ApiError::invalid(Some(field_of(&g, p)), e.to_string()));
                    }
                };
                self.seqs.insert(
                    id,
                    SeqState {
                        job,
                        choice,
                        stream: self.serving.codec.stream(),
                        hold: StopHold::new(g.stops.clone()),
                    },
                );
            }
        }
        self.jobs.insert(
            job,
            JobState {
                events,
                open: wanted,
            },
        );
        Ok(Accepted {
            job,
            prompt_tokens,
            echoes,
        })
    }

    pub(crate) fn cancel(&mut self, sched: &mut Scheduler, job: JobId) {
        for (id, s) in &self.seqs {
            if s.job == job {
                sched.cancel(*id);
            }
        }
    }

    /// Each new token: its text through the stop strings, to the client.
    pub(crate) fn on_token(&mut self, ev: &rabbit_core::TokenEvent<'_>) -> Control {
        let Some(s) = self.seqs.get_mut(&ev.sequence) else {
            return Control::StopSequence;
        };
        let piece = match s.stream.step(ev.token) {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                // The final text is the full decode anyway (finish); the stream only lags.
                tracing::warn!("decoding token {} for a stream: {e}", ev.token);
                String::new()
            }
        };
        let text = s.hold.push(&piece).to_string();
        let logprobs = ev
            .logprobs
            .map(|lp| {
                let tok = |id: u32| self.serving.codec.token_text_and_bytes(id);
                let (token, bytes) = tok(ev.token);
                vec![TokenLp {
                    token,
                    bytes,
                    logprob: lp.logprob,
                    top: lp
                        .top
                        .iter()
                        .map(|&(id, v)| {
                            let (t, b) = tok(id);
                            (t, b, v)
                        })
                        .collect(),
                }]
            })
            .unwrap_or_default();
        let stopped = s.hold.stopped();
        let Some(job) = self.jobs.get(&s.job) else {
            return Control::StopSequence;
        };
        let sent = job.events.send(Event::Delta {
            choice: s.choice,
            text,
            logprobs,
        });
        // A client that left gets nothing more computed; a stop string ends the choice.
        if sent.is_err() || stopped {
            Control::StopSequence
        } else {
            Control::Continue
        }
    }

    pub(crate) fn finish(
        &mut self,
        id: SeqId,
        reason: FinishReason,
        ids: &[u32],
        error: Option<&rabbit_core::CoreError>,
    ) {
        let Some(mut s) = self.seqs.remove(&id) else {
            return;
        };
        if let Some(e) = error {
            // The request fails as a whole; its other choices stop at their next token (their
            // job is gone), and nobody else's are touched.
            if let Some(job) = self.jobs.remove(&s.job) {
                let _ = job.events.send(Event::Failed(e.to_string()));
            }
            return;
        }
        let Some(job) = self.jobs.get_mut(&s.job) else {
            return;
        };
        // The incremental decoder holds back bytes of a character not yet complete; at the end
        // the answer is what decoding all its tokens gives (as `rabbit generate` reports it).
        let mut tail = String::new();
        if !s.hold.stopped() {
            if let Ok(full) = self.serving.codec.decode(ids) {
                match full.strip_prefix(s.hold.text()) {
                    Some(rest) => tail.push_str(s.hold.push(rest)),
                    None => tracing::warn!(
                        "the streamed text is not a prefix of the full decode; the stream keeps it"
                    ),
                }
            }
        }
        tail.push_str(s.hold.finish());
        if !tail.is_empty() {
            let _ = job.events.send(Event::Delta {
                choice: s.choice,
                text: tail,
                logprobs: vec![],
            });
        }
        let reason = match reason {
            // The held-back text completed a stop string.
            _ if s.hold.stopped() => "stop",
            FinishReason::Length => "length",
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Cancelled | FinishReason::Failed => "abort",
        };
        let _ = job.events.send(Event::Done {
            choice: s.choice,
            reason,
            completion_tokens: ids.len(),
        });
        job.open = job.open.saturating_sub(1);
        if job.open == 0 {
            self.jobs.remove(&s.job);
        }
    }
}
