//! Driving a `rabbit serve` process over loopback with raw HTTP/1.1 (no client library, so
//! streams can be read chunk by chunk and connections dropped mid-stream).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{assert_ok, last_json_line, rabbit, run};

/// A `rabbit serve` process on a free loopback port, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Server {
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
        // The guard first: whatever panics below, the process is killed.
        let mut s = Server {
            child,
            addr: String::new(),
            log,
        };
        s.addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line; stderr: {}", s.log()));
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!(
                    "the server exited ({status}) before it was ready: {}",
                    s.log()
                );
            }
            if TcpStream::connect(&s.addr).is_ok() && s.get("/health").0 == 200 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "not ready: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> (u16, String, String) {
        http(&self.addr, "GET", path, &[], "")
    }

    /// Polls `/metrics` until `ready` holds (60 s at most, else panics with `what`); returns
    /// the text that satisfied it.
    pub fn wait_metrics(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let m = self.get("/metrics").2;
            if ready(&m) {
                return m;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{what}:\n{m}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until a sequence is running.
    pub fn wait_running(&self) {
        self.wait_metrics("nothing runs", |m| {
            metric(m, "rabbit_running_sequences") >= 1.0
        });
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, String, String) {
        http(&self.addr, "POST", path, &[], &body.to_string())
    }

    /// SIGTERM; the process must exit 0 within a bounded time (its log, shutdown included,
    /// in the failure message).
    pub fn terminate_ok(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The log thread has the last lines once the pipe closes.
                std::thread::sleep(Duration::from_millis(50));
                assert!(s.success(), "exit {s}: {}", self.log());
                return;
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
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
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
    // An overall deadline: keep-alive comments would renew a per-read timeout forever.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("{method} {path}: reading the response: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{method} {path}: no end of response in 300 s"
        );
    }
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

pub fn dechunk(mut s: &str) -> String {
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
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A streamed chat answer: its text, finish reason and usage.
pub fn stream_chat(addr: &str, body: &Value) -> (String, String, Value) {
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
pub fn generate_alone(model: &Path, prompt: &str, n: usize) -> (String, usize) {
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

pub fn chat_body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}
