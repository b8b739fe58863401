//! Peak-memory measurement: RSS high-water mark on the host, allocator peak on CUDA.

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Resident memory of this process that is not file pages (`/proc/self/statm` resident minus
/// shared): its own heap, stacks and anonymous maps. File pages (mapped weights, kept mappings
/// of streamed layers) are page cache, which the kernel can drop, and are left out.
pub fn current_anon() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut f = text.split_ascii_whitespace().skip(1);
    let resident: u64 = f.next()?.parse().ok()?;
    let shared: u64 = f.next()?.parse().ok()?;
    let page = rustix::param::page_size() as u64;
    Some(resident.saturating_sub(shared) * page)
}

static PEAK_ANON: AtomicU64 = AtomicU64::new(0);

/// Samples [`current_anon`] into the high-water mark [`peak_anon`] (the engine samples after
/// every sweep).
pub fn sample_anon() {
    if let Some(a) = current_anon() {
        PEAK_ANON.fetch_max(a, Ordering::Relaxed);
    }
}

/// The largest [`current_anon`] sampled so far (after each sweep, and now).
pub fn peak_anon() -> Option<u64> {
    sample_anon();
    match PEAK_ANON.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}
