//! `rabbit serve` end to end, over loopback: raw HTTP (a bad-request matrix, limits, 64
//! concurrent streams each equal to `rabbit generate` alone, clients killed mid-stream, a clean
//! shutdown) and the real `openai` Python client (tests/serve_openai.py).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A `rabbit serve` process on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = rabbit()
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rabbit serve runs");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line; stderr: {}", log.lock().unwrap()));
        let s = Server { child, addr, log };
        let start = Instant::now();
        while s.get("/health").0 != 200 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "not ready: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> (u16, String, String) {
        http(&self.addr, "GET", path, &[], "")
    }

    fn post(&self, path: &str, body: &Value) -> (u16, String, String) {
        http(&self.addr, "POST", path, &[], &body.to_string())
    }

    /// SIGTERM; the exit status, within a bounded time.
    fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "hangs at shutdown: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange: status, headers, body (de-chunked).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("the response is UTF-8");
    let (head, rest) = raw.split_once("\r\n\r\n").expect("a response");
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, head.to_string(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?} after {out:?}"));
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A streamed chat answer: its text, finish reason and usage.
fn stream_chat(addr: &str, body: &Value) -> (String, String, Value) {
    let (status, _, text) = http(addr, "POST", "/v1/chat/completions", &[], &body.to_string());
    assert_eq!(status, 200, "{text}");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let (mut content, mut finish, mut usage) = (String::new(), String::new(), Value::Null);
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(c) = v["choices"].get(0) {
            content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        } else {
            usage = v["usage"].clone();
        }
    }
    (content, finish, usage)
}

/// `rabbit generate --chat` alone, in float32: (text, new tokens).
///
/// Float32 because "the same tokens batched as alone" is a property of exact-enough arithmetic:
/// in bf16 a batched matmul rounds differently from a one-row one, and a random model's
/// near-ties then flip (as in any engine that batches).
fn generate_alone(model: &Path, prompt: &str, n: usize) -> (String, usize) {
    let o = run(rabbit()
        .args([
            "generate",
            "--json",
            "--chat",
            "--dtype",
            "f32",
            "--max-new-tokens",
            &n.to_string(),
            "--prompt",
            prompt,
            "--model",
        ])
        .arg(model));
    assert_ok(&o);
    let v = last_json_line(&o);
    let s = &v["sequences"][0];
    (
        s["text"].as_str().unwrap().to_string(),
        s["output_ids"].as_array().unwrap().len(),
    )
}

fn chat_body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

/// 64 concurrent streaming requests (8 prompts x 8 clients, 8 rows, chunked prefill) each get
/// exactly what `rabbit generate` gives that prompt alone; 8 more clients hang up after their
/// first chunk and stop costing compute; SIGTERM then ends the server with status 0.
#[test]
fn concurrent_streams_equal_generate_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_model(&model, 5);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Question {i}: tell me about {}", "rabbits ".repeat(i + 1)))
        .collect();
    let want: Vec<(String, usize)> = prompts
        .iter()
        .map(|p| generate_alone(&model, p, 12))
        .collect();
    let server = Server::start(
        &model,
        &[
            "--served-model-name",
            "tiny",
            "--dtype",
            "f32",
            "--max-batch",
            "8",
            "--prefill-chunk",
            "5",
            "--keepalive",
            "0.2",
        ],
    );
    let addr = server.addr.clone();
    let mut handles = Vec::new();
    for k in 0..64 {
        let (addr, p) = (addr.clone(), prompts[k % 8].clone());
        handles.push(std::thread::spawn(move || {
            (k % 8, stream_chat(&addr, &chat_body(&p, 12, true)))
        }));
    }
    for _ in 0..8 {
        let addr = addr.clone();
        handles.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            let body = chat_body("a long answer nobody reads", 2000, true).to_string();
            write!(
                s,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).unwrap();
            // Hang up mid-stream.
            drop(s);
            (usize::MAX, (String::new(), String::new(), Value::Null))
        }));
    }
    for h in handles {
        let (i, (text, finish, usage)) = h.join().unwrap();
        if i == usize::MAX {
            continue;
        }
        assert_eq!(text, want[i].0, "prompt {i}");
        assert_eq!(usage["completion_tokens"], want[i].1, "prompt {i}");
        assert_eq!(finish, "length");
    }
    // The abandoned sequences leave: nothing runs or waits, and far fewer than their 3000
    // tokens each were generated.
    let start = Instant::now();
    loop {
        let m = server.get("/metrics").2;
        if metric(&m, "rabbit_running_sequences") == 0.0 && metric(&m, "rabbit_queue_depth") == 0.0
        {
            assert!(
                metric(&m, "rabbit_generation_tokens_total") < (64 * 12 + 8 * 1000) as f64,
                "{m}"
            );
            assert!(
                m.contains("rabbit_requests_total{endpoint=\"chat_completions\",status=\"200\"}"),
                "{m}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "abandoned streams keep running:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = server.log();
    assert!(server.terminate().success(), "{log}");
}

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
    assert!(server.terminate().success());
}

/// Beyond --max-batch running and --max-queue waiting: 429 with Retry-After; a shutdown ends a
/// running stream with a final event (finish_reason "abort") and exits 0.
#[test]
fn full_queue_is_429_and_shutdown_ends_streams() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_model(&model, 3);
    let server = Server::start(
        &model,
        &[
            "--served-model-name",
            "tiny",
            "--max-batch",
            "1",
            "--max-queue",
            "0",
            "--shutdown-grace",
            "0.5",
        ],
    );
    let addr = server.addr.clone();
    // A stream long enough to outlive the test's requests.
    let long = std::thread::spawn(move || {
        let (_, _, text) = http(
            &addr,
            "POST",
            "/v1/chat/completions",
            &[],
            &chat_body("go on", 2000, true).to_string(),
        );
        text
    });
    let start = Instant::now();
    while metric(&server.get("/metrics").2, "rabbit_running_sequences") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (s, head, text) = server.post("/v1/chat/completions", &chat_body("me too", 4, false));
    assert_eq!(s, 429, "{text}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert!(text.contains("--max-queue 0"), "{text}");
    let log = server.log();
    assert!(server.terminate().success(), "{log}");
    let text = long.join().unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(
        text.contains("\"finish_reason\":\"abort\"")
            || text.contains("\"finish_reason\":\"length\""),
        "{text}"
    );
}

/// Bad settings are refused before anything loads; a model that cannot load ends the server
/// with the reason and a non-zero status; a taken port is named.
#[test]
fn bad_settings_and_failed_loads_exit_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let o = run_watched(
        rabbit()
            .args(["serve", "--port", "0", "--model"])
            .arg(dir.path().join("missing")),
    );
    assert_clean_failure(&o, &["missing"]);
    let model = dir.path().join("m");
    tiny_model(&model, 4);
    for (args, needle) in [
        (vec!["--max-batch", "0"], "--max-batch"),
        (vec!["--keepalive", "0"], "--keepalive"),
        (vec!["--draft-tokens", "3"], "--draft-tokens"),
        (vec!["--api-key", ""], "--api-key"),
        (vec!["--host", "localhost:80"], "--host"),
    ] {
        let o = run_watched(
            rabbit()
                .args(["serve", "--port", "0", "--model"])
                .arg(&model)
                .args(&args),
        );
        assert_clean_failure(&o, &[needle]);
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = run_watched(
        rabbit()
            .args(["serve", "--port", &port, "--model"])
            .arg(&model),
    );
    assert_clean_failure(&o, &["--port", &port]);
}

/// The real `openai` Python client: chat and completions, streamed and not, n > 1, stop,
/// include_usage, logprobs, errors as its exception types.
#[test]
fn openai_python_client() {
    let venv = std::env::var("RABBIT_VENV").expect(
        "RABBIT_VENV: run the tests with ./scripts/test.sh (it installs the openai client)",
    );
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_model(&model, 6);
    let (want, _) = generate_alone(&model, "Say something", 10);
    let server = Server::start(
        &model,
        &[
            "--served-model-name",
            "tiny",
            "--dtype",
            "f32",
            "--api-key",
            "k1",
        ],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py");
    let o = run(
        std::process::Command::new(Path::new(&venv).join("bin/python"))
            .arg(script)
            .arg(format!("http://{}/v1", server.addr))
            .arg(&want),
    );
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}\nserver: {}",
        stdout(&o),
        stderr(&o),
        server.log()
    );
    assert!(
        stdout(&o).contains("all openai client checks passed"),
        "{}",
        stdout(&o)
    );
}
