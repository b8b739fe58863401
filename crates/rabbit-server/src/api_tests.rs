//! Parsing of request bodies: what is read, what is refused and by which name.

use serde_json::json;

use super::{parse, Endpoint, Prompt};

fn chat(v: serde_json::Value) -> Result<super::Generation, crate::ApiError> {
    parse(Endpoint::Chat, v.to_string().as_bytes(), 8)
}

fn completion(v: serde_json::Value) -> Result<super::Generation, crate::ApiError> {
    parse(Endpoint::Completions, v.to_string().as_bytes(), 8)
}

fn param(r: Result<super::Generation, crate::ApiError>) -> String {
    r.err().and_then(|e| e.param).unwrap_or_default()
}

#[test]
fn chat_defaults_follow_openai() {
    let g = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
    assert_eq!(g.sampling.temperature, 1.0);
    assert_eq!(
        (g.n, g.max_tokens, g.stream, g.logprobs),
        (1, None, false, None)
    );
    let g = completion(json!({"model": "m", "prompt": "hi"})).unwrap();
    assert_eq!(g.max_tokens, Some(16));
}

#[test]
fn messages_text_parts_and_roles() {
    let g = chat(json!({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]}))
    .unwrap();
    let Prompt::Chat(m) = &g.prompts[0] else {
        panic!("a chat prompt")
    };
    assert_eq!(
        (m[0].role.as_str(), m[0].content.as_str()),
        ("system", "be brief")
    );
    assert_eq!(m[1].content, "a\nb");
    let bad =
        json!({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]});
    assert_eq!(param(chat(bad)), "messages[0].tool_calls");
}

#[test]
fn prompts_in_every_form() {
    let forms = [
        (json!("a"), 1),
        (json!(["a", "b", "c"]), 3),
        (json!([1, 2, 3]), 1),
        (json!([[1, 2], [3]]), 2),
    ];
    for (p, n) in forms {
        let g = completion(json!({"model": "m", "prompt": p})).unwrap();
        assert_eq!(g.prompts.len(), n);
    }
    assert!(matches!(
        completion(json!({"model": "m", "prompt": [7, 8]})).unwrap().prompts[0],
        Prompt::Ids(ref ids) if ids == &[7, 8]
    ));
    assert_eq!(
        param(completion(json!({"model": "m", "prompt": [1, -2]}))),
        "prompt[1]"
    );
    assert_eq!(
        param(completion(json!({"model": "m", "prompt": ["a", 3]}))),
        "prompt[1]"
    );
    assert_eq!(
        param(completion(json!({"model": "m", "prompt": []}))),
        "prompt"
    );
    assert_eq!(param(completion(json!({"model": "m"}))), "prompt");
}

#[test]
fn sampling_fields_and_neutral_values() {
    let base = |extra: serde_json::Value| {
        let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        chat(v)
    };
    let g = base(json!({"top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0, "temperature": 0}))
        .unwrap();
    assert_eq!(
        (
            g.sampling.top_k,
            g.sampling.top_p,
            g.sampling.repetition_penalty
        ),
        (None, None, None)
    );
    let g = base(json!({"top_k": 5, "top_p": 0.9, "seed": 3, "stop": "x", "n": 8})).unwrap();
    assert_eq!(
        (g.sampling.top_k, g.sampling.top_p, g.seed, g.n),
        (Some(5), Some(0.9), Some(3), 8)
    );
    assert_eq!(g.stops, ["x"]);
    for neutral in [
        json!({"tools": []}),
        json!({"tool_choice": "none"}),
        json!({"logit_bias": {}}),
        json!({"presence_penalty": 0}),
        json!({"response_format": {"type": "text"}}),
        json!({"store": false}),
        json!({"user": "u", "metadata": {"a": "b"}}),
    ] {
        assert!(base(neutral.clone()).is_ok(), "{neutral}");
    }
    for (asked, field) in [
        (json!({"n": 9}), "n"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"logit_bias": {"5": 1}}), "logit_bias"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            json!({"stream": true, "stream_options": {"include_usage": true, "x": 1}}),
            "stream_options.x",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"logprobs": 3}), "logprobs"),
        (json!({"stop": vec!["a"; 17]}), "stop"),
        (json!({"model": 5}), "model"),
        (json!({"seed": "s"}), "seed"),
    ] {
        assert_eq!(param(base(asked.clone())), field, "{asked}");
    }
}

#[test]
fn completion_only_fields() {
    let g = completion(json!({"model": "m", "prompt": "a", "logprobs": 5, "echo": false})).unwrap();
    assert_eq!(g.logprobs, Some(5));
    let e = completion(json!({"model": "m", "prompt": "a", "logprobs": 2, "echo": true}));
    assert_eq!(param(e), "echo");
    assert_eq!(
        param(completion(
            json!({"model": "m", "prompt": "a", "suffix": "z"})
        )),
        "suffix"
    );
    assert_eq!(
        param(completion(
            json!({"model": "m", "prompt": "a", "best_of": 3})
        )),
        "best_of"
    );
    // A chat field on the completions endpoint is unknown there.
    assert_eq!(
        param(completion(
            json!({"model": "m", "prompt": "a", "messages": []})
        )),
        "messages"
    );
}
