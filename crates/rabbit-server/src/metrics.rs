//! Counters for `GET /metrics`, in Prometheus' text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use rabbit_core::StepReport;

/// Everything `/metrics` shows.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    sweeps: AtomicU64,
    sweep_us: AtomicU64,
    prefill_sweeps: AtomicU64,
    bytes_streamed: AtomicU64,
    failures: AtomicU64,
    live: AtomicU64,
    waiting: AtomicU64,
    kv_bytes: AtomicU64,
    kv_used: AtomicU64,
    kv_capacity: AtomicU64,
    ttft_us: AtomicU64,
    ttft_count: AtomicU64,
    /// Tokens emitted and seconds of the recent window (for tokens/s).
    recent: Mutex<Recent>,
}

struct Recent {
    since: Instant,
    tokens: u64,
    last_rate: f64,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            since: Instant::now(),
            tokens: 0,
            last_rate: 0.0,
        }
    }
}

/// The window tokens/s is measured over.
const RATE_WINDOW_S: f64 = 10.0;

impl Metrics {
    /// A request answered with `status` on `endpoint`.
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        *self.requests.lock().entry((endpoint, status)).or_default() += 1;
    }

    /// Prompt tokens admitted.
    pub fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A first token reached a request after `secs`.
    pub fn record_ttft(&self, secs: f64) {
        self.ttft_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
    }

    /// KV cache allocated.
    pub fn set_kv_bytes(&self, b: u64) {
        self.kv_bytes.store(b, Ordering::Relaxed);
    }

    /// KV positions in all (rows x positions per row).
    pub fn set_capacity(&self, p: u64) {
        self.kv_capacity.store(p, Ordering::Relaxed);
    }

    /// The scheduler's occupancy now: running and waiting sequences, KV positions in use.
    pub fn set_occupancy(&self, live: usize, waiting: usize, kv_used: u64) {
        self.live.store(live as u64, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
        self.kv_used.store(kv_used, Ordering::Relaxed);
    }

    /// A step ran and read `bytes` of weights.
    pub fn record_step(&self, r: &StepReport, bytes: u64) {
        if r.rows == 0 {
            // Only retired finished or cancelled sequences: no sweep ran.
            return;
        }
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        if r.prefill {
            self.prefill_sweeps.fetch_add(1, Ordering::Relaxed);
        }
        self.sweep_us
            .fetch_add(((r.sweep_s + r.draft_s) * 1e6) as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(r.emitted as u64, Ordering::Relaxed);
        self.bytes_streamed.fetch_add(bytes, Ordering::Relaxed);
        let mut w = self.recent.lock();
        w.tokens += r.emitted as u64;
        let secs = w.since.elapsed().as_secs_f64();
        if secs >= RATE_WINDOW_S {
            w.last_rate = w.tokens as f64 / secs;
            w.tokens = 0;
            w.since = Instant::now();
        }
    }

    /// A sweep failed.
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let tokens = g(&self.generated_tokens);
        let sweeps = g(&self.sweeps);
        let sweep_s = g(&self.sweep_us) as f64 / 1e6;
        let bytes = g(&self.bytes_streamed);
        let rate = {
            let w = self.recent.lock();
            let secs = w.since.elapsed().as_secs_f64();
            // The last full window, or the current one once it has run long enough to say.
            if w.last_rate > 0.0 && secs < RATE_WINDOW_S {
                w.last_rate
            } else if secs > 0.0 {
                w.tokens as f64 / secs
            } else {
                0.0
            }
        };
        metric(
            "rabbit_prompt_tokens_total",
            "counter",
            "Prompt tokens admitted.",
            g(&self.prompt_tokens).to_string(),
        );
        metric(
            "rabbit_generation_tokens_total",
            "counter",
            "Tokens generated over all sequences.",
            tokens.to_string(),
        );
        metric(
            "rabbit_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last ten seconds, all sequences together.",
            format!("{rate:.3}"),
        );
        metric(
            "rabbit_sweeps_total",
            "counter",
            "Sweeps over the weights (each serves every live sequence).",
            sweeps.to_string(),
        );
        metric(
            "rabbit_prefill_sweeps_total",
            "counter",
            "Sweeps that carried a prompt chunk.",
            g(&self.prefill_sweeps).to_string(),
        );
        metric(
            "rabbit_sweep_seconds_total",
            "counter",
            "Time in sweeps, drafting included.",
            format!("{sweep_s:.6}"),
        );
        metric(
            "rabbit_sweep_seconds_mean",
            "gauge",
            "Mean time of a sweep.",
            format!("{:.6}", sweep_s / sweeps.max(1) as f64),
        );
        metric(
            "rabbit_bytes_streamed_total",
            "counter",
            "Weight bytes read from layer files.",
            bytes.to_string(),
        );
        metric(
            "rabbit_bytes_streamed_per_token",
            "gauge",
            "Weight bytes read per generated token (a sweep's bytes are shared by all its tokens).",
            format!("{:.1}", bytes as f64 / tokens.max(1) as f64),
        );
        metric(
            "rabbit_sweep_failures_total",
            "counter",
            "Sweeps that failed (their requests got an error).",
            g(&self.failures).to_string(),
        );
        metric(
            "rabbit_running_sequences",
            "gauge",
            "Sequences in the sweep.",
            g(&self.live).to_string(),
        );
        metric(
            "rabbit_queue_depth",
            "gauge",
            "Sequences waiting for a row.",
            g(&self.waiting).to_string(),
        );
        metric(
            "rabbit_kv_cache_bytes",
            "gauge",
            "KV cache allocated.",
            g(&self.kv_bytes).to_string(),
        );
        metric(
            "rabbit_kv_cache_used_positions",
            "gauge",
            "KV positions holding tokens of running sequences.",
            g(&self.kv_used).to_string(),
        );
        metric(
            "rabbit_kv_cache_usage_ratio",
            "gauge",
            "Used over allocated KV positions.",
            format!(
                "{:.4}",
                g(&self.kv_used) as f64 / g(&self.kv_capacity).max(1) as f64
            ),
        );
        let (ttft, n) = (g(&self.ttft_us) as f64 / 1e6, g(&self.ttft_count));
        let _ = writeln!(s, "# HELP rabbit_time_to_first_token_seconds Time from a request's arrival to its first token.\n# TYPE rabbit_time_to_first_token_seconds summary\nrabbit_time_to_first_token_seconds_sum {ttft:.6}\nrabbit_time_to_first_token_seconds_count {n}");
        let _ = writeln!(s, "# HELP rabbit_requests_total Requests answered, by endpoint and HTTP status.\n# TYPE rabbit_requests_total counter");
        for ((endpoint, status), count) in self.requests.lock().iter() {
            let _ = writeln!(
                s,
                "rabbit_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {count}"
            );
        }
        s
    }
}
