//! The JSON OpenAI clients read: whole responses, stream chunks, log-probabilities, usage.

use serde_json::{json, Value};

use crate::api::Endpoint;
use crate::worker::TokenLp;

/// What every response of one request shares.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
    /// Which endpoint.
    pub endpoint: Endpoint,
}

/// One choice as it accumulates.
#[derive(Debug, Clone, Default)]
pub struct Choice {
    /// Its text so far.
    pub text: String,
    /// Per token, when asked for.
    pub logprobs: Vec<TokenLp>,
    /// Set when it ended.
    pub finish: Option<&'static str>,
    /// Tokens generated.
    pub tokens: usize,
}

/// `usage`.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Chat's per-token entries.
fn chat_logprobs(lps: &[TokenLp]) -> Value {
    let entry = |token: &str, bytes: &[u8], logprob: f32| json!({"token": token, "logprob": logprob, "bytes": bytes});
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = entry(&t.token, &t.bytes, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(s, b, v)| entry(s, b, *v)).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Completions' parallel lists; `offset` is where the first token's text starts.
fn completion_logprobs(lps: &[TokenLp], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(lps.len());
    for t in lps {
        text_offset.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": lps.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps
            .iter()
            .map(|t| t.top.iter().map(|(s, _, v)| (s.clone(), json!(v))).collect::<serde_json::Map<_, _>>())
            .collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

impl Meta {
    /// A whole (non-streamed) response.
    pub fn response(
        &self,
        choices: &[Choice],
        echoes: &[String],
        n: usize,
        prompt_tokens: usize,
        want_logprobs: bool,
    ) -> Value {
        let completion: usize = choices.iter().map(|c| c.tokens).sum();
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| match self.endpoint {
                Endpoint::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": null},
                    "logprobs": if want_logprobs { chat_logprobs(&c.logprobs) } else { Value::Null },
                    "finish_reason": c.finish,
                }),
                Endpoint::Completions => {
                    let echo = echoes.get(i / n.max(1)).map_or("", String::as_str);
                    json!({
                        "index": i,
                        "text": format!("{echo}{}", c.text),
                        "logprobs": if want_logprobs { completion_logprobs(&c.logprobs, echo.len()) } else { Value::Null },
                        "finish_reason": c.finish,
                    })
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": list,
            "usage": usage(prompt_tokens, completion),
        })
    }

    fn chunk(&self, choices: Vec<Value>, include_usage: bool) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The chunk that opens a chat choice (its role).
    pub fn role_chunk(&self, index: usize, include_usage: bool) -> Value {
        self.chunk(
            vec![json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})],
            include_usage,
        )
    }

    /// New text of a choice; `offset` is the choice's text length so far (completions'
    /// `text_offset`).
    pub fn delta_chunk(
        &self,
        index: usize,
        text: &str,
        lps: Option<&[TokenLp]>,
        offset: usize,
        include_usage: bool,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": index,
                "delta": {"content": text},
                "logprobs": lps.map_or(Value::Null, chat_logprobs),
                "finish_reason": null,
            }),
            Endpoint::Completions => json!({
                "index": index,
                "text": text,
                "logprobs": lps.map_or(Value::Null, |l| completion_logprobs(l, offset)),
                "finish_reason": null,
            }),
        };
        self.chunk(vec![choice], include_usage)
    }

    /// The chunk that ends a choice.
    pub fn finish_chunk(&self, index: usize, reason: &str, include_usage: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})
            }
            Endpoint::Completions => {
                json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason})
            }
        };
        self.chunk(vec![choice], include_usage)
    }

    /// `stream_options.include_usage`'s last chunk: no choices, the usage.
    pub fn usage_chunk(&self, prompt_tokens: usize, completion: usize) -> Value {
        let mut c = self.chunk(vec![], false);
        c["usage"] = usage(prompt_tokens, completion);
        c
    }
}
