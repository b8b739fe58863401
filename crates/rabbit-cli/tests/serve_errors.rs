//! `rabbit serve`: every bad request is answered with an OpenAI-style error body naming what is
//! wrong, with OpenAI's status codes.

mod common;

use common::server::*;
use common::*;
use serde_json::{json, Value};

/// Every bad request is answered with an OpenAI-style error naming what is wrong.
#[test]
fn bad_requests_get_openai_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_model(&model, 2);
    let server = Server::start(
        &model,
        &[
            "--served-model-name",
            "tiny",
            "--api-key",
            "sekrit",
            "--context",
            "64",
        ],
    );
    let auth = [("Authorization", "Bearer sekrit")];
    let call = |body: &str| http(&server.addr, "POST", "/v1/chat/completions", &auth, body);
    let ok = chat_body("hi", 4, false);
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b.to_string()
    };
    let cases: Vec<(String, u16, Value, &str)> = vec![
        ("{not json".into(), 400, Value::Null, "not valid JSON"),
        ("[1, 2]".into(), 400, Value::Null, "JSON object"),
        (with("model", json!("gpt-4")), 404, json!("model"), "gpt-4"),
        (
            with("max_tokens", json!(-1)),
            400,
            json!("max_tokens"),
            "at least 1",
        ),
        (
            with("max_tokens", json!(1_000_000_000)),
            400,
            json!("max_tokens"),
            "maximum context length is 64",
        ),
        (
            with("max_tokens", json!("many")),
            400,
            json!("max_tokens"),
            "invalid type",
        ),
        (
            with("temperature", json!("hot")),
            400,
            json!("temperature"),
            "invalid type",
        ),
        (
            with("temperature", json!(-1)),
            400,
            json!("temperature"),
            ">= 0",
        ),
        (with("top_p", json!(0)), 400, json!("top_p"), "(0, 1]"),
        (
            with("messages", json!("hi")),
            400,
            json!("messages"),
            "invalid type",
        ),
        (
            with("messages", json!([])),
            400,
            json!("messages"),
            "at least one",
        ),
        (
            with("messages", json!([{"role": "user"}])),
            400,
            json!("messages[0].content"),
            "provide",
        ),
        (
            with("messages", json!([{"role": "tool", "content": "x"}])),
            400,
            json!("messages[0].role"),
            "tool",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
            400,
            json!("messages[0].content[0].type"),
            "image_url",
        ),
        (
            json!({"model": "tiny"}).to_string(),
            400,
            json!("messages"),
            "messages",
        ),
        (
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            400,
            json!("tools"),
            "not supported",
        ),
        (
            with("response_format", json!({"type": "json_object"})),
            400,
            json!("response_format"),
            "not supported",
        ),
        (
            with("frequency_penalty", json!(0.5)),
            400,
            json!("frequency_penalty"),
            "not supported",
        ),
        (
            with("frobnicate", json!(1)),
            400,
            json!("frobnicate"),
            "unrecognized request argument",
        ),
        (with("n", json!(0)), 400, json!("n"), "'n'"),
        (with("stop", json!([""])), 400, json!("stop"), "empty"),
        (with("stop", json!(5)), 400, json!("stop"), "string"),
        (
            with("top_logprobs", json!(3)),
            400,
            json!("top_logprobs"),
            "logprobs",
        ),
        (
            with(
                "messages",
                json!([{"role": "user", "content": "x ".repeat(200)}]),
            ),
            400,
            json!("messages"),
            "maximum context length",
        ),
    ];
    for (body, status, param, needle) in &cases {
        let (s, _, text) = call(body);
        assert_eq!(s, *status, "{body}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{body}: not JSON: {text}"));
        let e = &v["error"];
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {text}"
        );
        assert!(e["type"].is_string(), "{text}");
        if !param.is_null() {
            assert_eq!(&e["param"], param, "{body}: {text}");
        }
    }
    // Neutral values of fields this server lacks ask for nothing, so they pass.
    let mut neutral = ok.clone();
    for (k, v) in [
        ("tools", json!([])),
        ("presence_penalty", json!(0)),
        ("logit_bias", json!({})),
        ("user", json!("u1")),
        ("response_format", json!({"type": "text"})),
    ] {
        neutral[k] = v;
    }
    let (s, _, text) = call(&neutral.to_string());
    assert_eq!(s, 200, "{text}");
    // The key: missing or wrong is 401; /health and /metrics need none.
    for h in [vec![], vec![("Authorization", "Bearer wrong")]] {
        let (s, _, text) = http(
            &server.addr,
            "POST",
            "/v1/chat/completions",
            &h,
            &ok.to_string(),
        );
        assert_eq!(s, 401, "{text}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
            "invalid_api_key"
        );
    }
    let (s, _, text) = http(&server.addr, "GET", "/v1/models", &auth, "");
    assert_eq!(
        (
            s,
            serde_json::from_str::<Value>(&text).unwrap()["data"][0]["id"].clone()
        ),
        (200, json!("tiny"))
    );
    let (s, _, text) = http(&server.addr, "GET", "/v1/nothing", &auth, "");
    assert_eq!(s, 404, "{text}");
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
    let m = server.get("/metrics").2;
    assert!(
        m.contains("rabbit_requests_total{endpoint=\"chat_completions\",status=\"401\"} 2"),
        "{m}"
    );
    server.terminate_ok();
}
