//! Peak-memory measurement: RSS high-water mark on the host, allocator peak on CUDA.

use serde::Serialize;

/// Memory figures reported after a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    /// Peak resident set size of this process (bytes), from /proc/self/status VmHWM.
    pub peak_rss_bytes: Option<u64>,
    /// Current resident set size (bytes).
    pub rss_bytes: Option<u64>,
    /// Peak device memory (bytes) when running on CUDA, if measurable.
    pub peak_device_bytes: Option<u64>,
    /// Bytes the KV cache took.
    pub kv_cache_bytes: u64,
    /// Bytes of weights kept resident on the compute device.
    pub resident_weight_bytes: u64,
    /// Bytes of host staging buffers for streamed layers.
    pub staging_bytes: u64,
}

fn status_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak RSS so far (bytes).
pub fn peak_rss() -> Option<u64> {
    status_field("VmHWM:")
}

/// Current RSS (bytes).
pub fn current_rss() -> Option<u64> {
    status_field("VmRSS:")
}
