//! The request bodies of `/v1/chat/completions` and `/v1/completions`, checked field by field:
//! what this server implements is read, what it does not is refused by name (a neutral value,
//! such as `presence_penalty: 0` or `tools: []`, is accepted: it asks for nothing), and an
//! unknown field is refused as OpenAI refuses it.

use rabbit_core::step::MAX_TOP_LOGPROBS;
use rabbit_core::SamplingParams;
use rabbit_models::chat::Message;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Stop strings per request at most.
pub const MAX_STOPS: usize = 16;

/// What the engine thread is asked to run, before tokenization.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat format.
    Chat(Vec<Message>),
    /// Text, encoded as `rabbit generate --prompt` does.
    Text(String),
    /// Token ids as given.
    Ids(Vec<u32>),
}

/// A parsed, checked request: one or more prompts, `n` choices each.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The `model` field.
    pub model: String,
    /// Prompts (chat: one).
    pub prompts: Vec<Prompt>,
    /// Choices per prompt.
    pub n: usize,
    /// New tokens at most (`None`: what the context leaves).
    pub max_tokens: Option<usize>,
    /// Token choice (the seed is per choice, from `seed`).
    pub sampling: SamplingParams,
    /// `seed`, when given.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Log-probabilities: the number of alternatives per token, when asked for.
    pub logprobs: Option<usize>,
    /// Completions: the prompt's text precedes the completion.
    pub echo: bool,
    /// Extension (as vLLM's): generate past end-of-sequence tokens, up to `max_tokens` (for
    /// benchmarks).
    pub ignore_eos: bool,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk with the usage.
    pub include_usage: bool,
}

/// Which endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "service_tier",
    "metadata",
    "store",
];
const CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "modalities",
];
const COMPLETIONS: &[&str] = &["prompt", "echo", "suffix", "best_of"];

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    model: Value,
    messages: Option<Vec<Value>>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    repetition_penalty: Option<f64>,
    ignore_eos: Option<bool>,
    seed: Option<i64>,
    stop: Option<Value>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    top_logprobs: Option<i64>,
    echo: Option<bool>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    best_of: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    #[allow(dead_code)]
    continuous_usage_stats: Option<bool>,
}

/// Parses and checks a request body; `max_n` bounds the choices a request may ask for.
pub fn parse(endpoint: Endpoint, bytes: &[u8], max_n: usize) -> Result<Generation, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    };
    let own = match endpoint {
        Endpoint::Chat => CHAT,
        Endpoint::Completions => COMPLETIONS,
    };
    if let Some(k) = map
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            Some(k.clone()),
            format!("unrecognized request argument supplied: {k}"),
        ));
    }
    refuse_non_neutral(&map)?;
    let body: Body = serde_path_to_error::deserialize(Value::Object(map.clone())).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(Some(path.clone()), format!("'{path}': {}", e.inner()))
    })?;
    let model = match &body.model {
        Value::String(s) => s.clone(),
        Value::Null => return Err(missing("model")),
        other => return Err(wrong_type("model", "a string", other)),
    };
    let prompts = match endpoint {
        Endpoint::Chat => vec![Prompt::Chat(messages(body.messages)?)],
        Endpoint::Completions => prompts(body.prompt)?,
    };
    let max_tokens = match (endpoint, body.max_completion_tokens, body.max_tokens) {
        (_, Some(m), _) => Some(positive("max_completion_tokens", m)?),
        (_, None, Some(m)) => Some(positive("max_tokens", m)?),
        // OpenAI's default for completions; chat runs to the end of the context.
        (Endpoint::Completions, None, None) => Some(16),
        (Endpoint::Chat, None, None) => None,
    };
    let n = match body.n {
        None => 1,
        Some(n) if n >= 1 && (n as u64) <= max_n as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                Some("n".into()),
                format!("'n' must be in 1..={max_n} (this server's --max-batch), got {n}"),
            ))
        }
    };
    if let Some(b) = body.best_of {
        if b != 1 && b as u64 != n as u64 {
            return Err(ApiError::unsupported("best_of", format!("best_of = {b}")));
        }
    }
    let temperature = body.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::invalid(
            Some("temperature".into()),
            format!("'temperature' must be >= 0, got {temperature}"),
        ));
    }
    let top_p = match body.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid(
                Some("top_p".into()),
                format!("'top_p' must be in (0, 1], got {p}"),
            ))
        }
        p => p.filter(|&p| p < 1.0),
    };
    let top_k = match body.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k".into()),
                format!("'top_k' must be >= 1 (0 or -1: no limit), got {k}"),
            ))
        }
    };
    let repetition_penalty = match body.repetition_penalty {
        Some(r) if !(r.is_finite() && r > 0.0) => {
            return Err(ApiError::invalid(
                Some("repetition_penalty".into()),
                format!("'repetition_penalty' must be > 0, got {r}"),
            ))
        }
        r => r.filter(|&r| r != 1.0),
    };
    let sampling = SamplingParams {
        // As vLLM: a temperature this small is greedy decoding (dividing by it would overflow
        // the scores and fail the sweep).
        temperature: if temperature < 1e-5 { 0.0 } else { temperature },
        top_k,
        top_p,
        repetition_penalty,
        seed: 0,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(Some("temperature".into()), e.to_string()))?;
    let seed = body.seed.map(|s| s as u64);
    let logprobs = logprobs(endpoint, body.logprobs, body.top_logprobs)?;
    let echo = body.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::unsupported(
            "echo",
            "echo together with logprobs (log-probabilities of prompt tokens)",
        ));
    }
    let stream = body.stream.unwrap_or(false);
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    if body.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            Some("stream_options".into()),
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    for (name, v) in [
        ("frequency_penalty", body.frequency_penalty),
        ("presence_penalty", body.presence_penalty),
    ] {
        if let Some(v) = v.filter(|&v| v != 0.0) {
            return Err(ApiError::unsupported(
                name,
                format!("{name} = {v} (repetition_penalty is)"),
            ));
        }
    }
    Ok(Generation {
        model,
        prompts,
        n,
        max_tokens,
        sampling,
        seed,
        stops: stops(body.stop)?,
        logprobs,
        echo,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        stream,
        include_usage,
    })
}

fn missing(field: &str) -> ApiError {
    ApiError::invalid(
        Some(field.to_string()),
        format!("you must provide '{field}'"),
    )
}

fn wrong_type(field: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        Some(field.to_string()),
        format!("'{field}' must be {want}, got {}", kind_of(got)),
    )
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn positive(field: &str, v: i64) -> Result<usize, ApiError> {
    if v < 1 {
        return Err(ApiError::invalid(
            Some(field.to_string()),
            format!("'{field}' must be at least 1, got {v}"),
        ));
    }
    Ok(v as usize)
}

/// Fields accepted only with a value that asks for nothing.
fn refuse_non_neutral(map: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in map {
        let neutral = match k.as_str() {
            "tools" | "functions" => v.is_null() || v.as_array().is_some_and(Vec::is_empty),
            "tool_choice" | "function_call" => v.is_null() || v == "none" || v == "auto",
            "logit_bias" => v.is_null() || v.as_object().is_some_and(Map::is_empty),
            "response_format" => {
                v.is_null()
                    || v.get("type").is_some_and(|t| t == "text")
                        && v.as_object().is_some_and(|o| o.len() == 1)
            }
            "modalities" => {
                v.is_null() || v.as_array().is_some_and(|a| a.iter().all(|m| m == "text"))
            }
            "suffix" => v.is_null() || v == "",
            "store" => v.is_null() || v == false,
            "service_tier" => v.is_null() || v == "auto" || v == "default",
            _ => true,
        };
        if !neutral {
            return Err(ApiError::unsupported(k, format!("'{k}' = {v}")));
        }
    }
    Ok(())
}

fn messages(messages: Option<Vec<Value>>) -> Result<Vec<Message>, ApiError> {
    let Some(list) = messages else {
        return Err(missing("messages"));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            Some("messages".into()),
            "'messages' must hold at least one message",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(wrong_type(&at, "an object", m));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !["role", "content", "name"].contains(&k.as_str()))
        {
            let field = format!("{at}.{k}");
            return Err(ApiError::unsupported(&field, format!("a message's '{k}'")));
        }
        let role = match m.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "user" | "assistant" => r.clone(),
                // OpenAI's newer name for the system role.
                "developer" => "system".into(),
                other => {
                    return Err(ApiError::unsupported(
                        &format!("{at}.role"),
                        format!("the role '{other}' (system, developer, user and assistant are)"),
                    ))
                }
            },
            None | Some(Value::Null) => return Err(missing(&format!("{at}.role"))),
            Some(other) => return Err(wrong_type(&format!("{at}.role"), "a string", other)),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(&at, parts)?,
            None | Some(Value::Null) => return Err(missing(&format!("{at}.content"))),
            Some(other) => {
                return Err(wrong_type(
                    &format!("{at}.content"),
                    "a string or an array of text parts",
                    other,
                ))
            }
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

/// Text parts joined by newlines (as vLLM joins them); any other part type is refused.
fn text_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let here = format!("{at}.content[{j}]");
        match p.get("type").and_then(Value::as_str) {
            Some("text") => match p.get("text") {
                Some(Value::String(t)) => texts.push(t.as_str()),
                Some(other) => return Err(wrong_type(&format!("{here}.text"), "a string", other)),
                None => return Err(missing(&format!("{here}.text"))),
            },
            Some(other) => {
                return Err(ApiError::unsupported(
                    &format!("{here}.type"),
                    format!("content of type '{other}' (this model reads text parts only)"),
                ))
            }
            None => return Err(missing(&format!("{here}.type"))),
        }
    }
    Ok(texts.join("\n"))
}

fn prompts(prompt: Option<Value>) -> Result<Vec<Prompt>, ApiError> {
    let ids = |a: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| wrong_type(&format!("{at}[{i}]"), "a token id", v))
            })
            .collect()
    };
    let list = match prompt {
        None | Some(Value::Null) => return Err(missing("prompt")),
        Some(Value::String(s)) => vec![Prompt::Text(s)],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid(
                Some("prompt".into()),
                "'prompt' is empty",
            ))
        }
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    other => Err(wrong_type(&format!("prompt[{i}]"), "a string", other)),
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(&a, "prompt")?)],
            Value::Array(_) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(inner) => Ok(Prompt::Ids(ids(inner, &format!("prompt[{i}]"))?)),
                    other => Err(wrong_type(
                        &format!("prompt[{i}]"),
                        "an array of token ids",
                        other,
                    )),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(wrong_type("prompt[0]", "a string or token ids", other)),
        },
        Some(other) => {
            return Err(wrong_type(
                "prompt",
                "a string, an array of strings or token ids",
                &other,
            ))
        }
    };
    Ok(list)
}

fn stops(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                other => Err(wrong_type(&format!("stop[{i}]"), "a string", &other)),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(wrong_type(
                "stop",
                "a string or an array of strings",
                &other,
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop".into()),
            format!("at most {MAX_STOPS} stop strings, got {}", list.len()),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop".into()),
            "a stop string must not be empty",
        ));
    }
    Ok(list)
}

/// Chat: `logprobs: bool` with `top_logprobs: 0..=20`; completions: `logprobs: 0..=20`.
fn logprobs(
    endpoint: Endpoint,
    logprobs: Option<Value>,
    top: Option<i64>,
) -> Result<Option<usize>, ApiError> {
    let range = |field: &str, v: i64| -> Result<usize, ApiError> {
        if v < 0 || v as usize > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                Some(field.to_string()),
                format!("'{field}' must be in 0..={MAX_TOP_LOGPROBS}, got {v}"),
            ));
        }
        Ok(v as usize)
    };
    match endpoint {
        Endpoint::Chat => {
            let on = match logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(other) => return Err(wrong_type("logprobs", "a boolean", &other)),
            };
            match (on, top) {
                (false, Some(_)) => Err(ApiError::invalid(
                    Some("top_logprobs".into()),
                    "'top_logprobs' needs 'logprobs': true",
                )),
                (true, t) => Ok(Some(range("top_logprobs", t.unwrap_or(0))?)),
                (false, None) => Ok(None),
            }
        }
        Endpoint::Completions => match logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                Ok(Some(range("logprobs", n.as_i64().unwrap_or(0))?))
            }
            Some(other) => Err(wrong_type("logprobs", "an integer", &other)),
        },
    }
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
