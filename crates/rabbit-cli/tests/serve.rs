//! `rabbit serve` end to end, over loopback: 64 concurrent streams each equal to `rabbit
//! generate` alone, clients killed mid-stream, limits, a clean shutdown, bad settings, and the
//! real `openai` Python client (tests/serve_openai.py). The bad-request matrix is in
//! serve_errors.rs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::server::*;
use common::*;
use serde_json::Value;

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
    let m = server.wait_metrics("abandoned streams keep running", |m| {
        metric(m, "rabbit_running_sequences") == 0.0 && metric(m, "rabbit_queue_depth") == 0.0
    });
    assert!(
        metric(&m, "rabbit_generation_tokens_total") < (64 * 12 + 8 * 1000) as f64,
        "{m}"
    );
    assert!(
        m.contains("rabbit_requests_total{endpoint=\"chat_completions\",status=\"200\"}"),
        "{m}"
    );
    server.terminate_ok();
}

/// A server on a tiny model with room for long answers (16k positions), one row: requests that
/// outlast whatever the test does meanwhile, however fast the machine.
fn long_server(dir: &Path, seed: u32, extra: &[&str]) -> Server {
    let model = dir.join("long");
    tiny_model_with(&model, seed, &["--max-position", "16384"]);
    let mut args = vec![
        "--served-model-name",
        "tiny",
        "--context",
        "16384",
        "--max-batch",
        "1",
    ];
    args.extend_from_slice(extra);
    Server::start(&model, &args)
}

/// A streamed greedy chat request of exactly `n` tokens (end-of-sequence ignored).
fn long_body(n: usize) -> Value {
    let mut b = chat_body("go on", n, true);
    b["ignore_eos"] = serde_json::json!(true);
    b
}

/// Beyond --max-batch running and --max-queue waiting: 429 with Retry-After; a shutdown ends a
/// running stream with a final event (finish_reason "abort") and exits 0.
#[test]
fn full_queue_is_429_and_shutdown_ends_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = long_server(
        dir.path(),
        3,
        &["--max-queue", "0", "--shutdown-grace", "0.5"],
    );
    let addr = server.addr.clone();
    // A stream long enough to outlive the test's requests and the shutdown grace.
    let long = std::thread::spawn(move || {
        let body = long_body(16000).to_string();
        http(&addr, "POST", "/v1/chat/completions", &[], &body).2
    });
    server.wait_running();
    let (s, head, text) = server.post("/v1/chat/completions", &chat_body("me too", 4, false));
    assert_eq!(s, 429, "{text}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert!(text.contains("--max-queue 0"), "{text}");
    server.terminate_ok();
    let text = long.join().unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"abort\""), "{text}");
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
    let mut child = std::process::Command::new(Path::new(&venv).join("bin/python"))
        .arg(script)
        .arg(format!("http://{}/v1", server.addr))
        .arg(&want)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the venv's python runs");
    // Bounded: the client's own read timeouts are renewed by keep-alive comments.
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the openai client checks hang; server: {}", server.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
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

/// A stream waiting for its first token (queued behind another) gets `: keep-alive` comments;
/// a non-streamed request whose client hangs up while it waits is never computed.
#[test]
fn waiting_streams_are_kept_alive_and_hang_ups_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = long_server(dir.path(), 8, &["--keepalive", "0.05"]);
    let addr = server.addr.clone();
    let first = std::thread::spawn(move || stream_chat(&addr, &long_body(6000)));
    server.wait_running();
    // Queued behind the first: hangs up at once, never to be computed.
    let mut gone = TcpStream::connect(&server.addr).unwrap();
    let body = {
        let mut b = long_body(6000);
        b["stream"] = serde_json::json!(false);
        b["stream_options"] = Value::Null;
        b.to_string()
    };
    write!(
        gone,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(gone);
    let (status, _, text) = server.post("/v1/chat/completions", &long_body(2));
    assert_eq!(status, 200, "{text}");
    // In order: a keep-alive comment comes before the first token's text.
    let mut alive = false;
    for line in text.lines() {
        if line.starts_with(": keep-alive") {
            alive = true;
        }
        let Some(Ok(v)) = line
            .strip_prefix("data: ")
            .map(serde_json::from_str::<Value>)
        else {
            continue;
        };
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            break;
        }
    }
    assert!(alive, "no keep-alive before the first token: {text}");
    assert_eq!(sse_data(&text).last().map(String::as_str), Some("[DONE]"));
    let (_, finish, usage) = first.join().unwrap();
    assert_eq!(
        (finish.as_str(), usage["completion_tokens"].as_u64()),
        ("length", Some(6000))
    );
    let m = server.get("/metrics").2;
    assert!(
        metric(&m, "rabbit_generation_tokens_total") < 6100.0,
        "the hung-up request ran:\n{m}"
    );
    server.terminate_ok();
}

/// Speculation in the server (a draft model, prompt lookup) keeps every greedy answer what
/// `rabbit generate` gives alone, with several requests in the same sweeps.
#[test]
fn speculating_servers_keep_greedy_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_model(&model, 9);
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("{i} one two three one two three one two"))
        .collect();
    let want: Vec<(String, usize)> = prompts
        .iter()
        .map(|p| generate_alone(&model, p, 10))
        .collect();
    let draft = model.to_str().unwrap().to_string();
    for spec in [
        vec!["--draft-model", draft.as_str(), "--draft-tokens", "3"],
        vec!["--prompt-lookup", "2", "--draft-tokens", "4"],
    ] {
        let mut args = vec![
            "--served-model-name",
            "tiny",
            "--dtype",
            "f32",
            "--max-batch",
            "4",
        ];
        args.extend(spec.iter().copied());
        let server = Server::start(&model, &args);
        // One request alone first: with the model as its own draft, several tokens per sweep
        // (10 tokens take 10 sweeps without speculation, 4 with every draft of 3 accepted).
        let (text, _, _) = stream_chat(&server.addr, &chat_body(&prompts[0], 10, true));
        assert_eq!(text, want[0].0, "{spec:?} alone");
        if spec[0] == "--draft-model" {
            let sweeps = metric(&server.get("/metrics").2, "rabbit_sweeps_total");
            assert!(sweeps <= 7.0, "{sweeps} sweeps for 10 tokens");
        }
        let handles: Vec<_> = prompts
            .iter()
            .cloned()
            .map(|p| {
                let addr = server.addr.clone();
                std::thread::spawn(move || stream_chat(&addr, &chat_body(&p, 10, true)))
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let (text, _, usage) = h.join().unwrap();
            assert_eq!(text, want[i].0, "{spec:?} prompt {i}");
            assert_eq!(usage["completion_tokens"], want[i].1);
        }
        server.terminate_ok();
    }
}
