//! What the HTTP side shares with the engine thread: whether the model is loading, ready or
//! failed, and the metrics.

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What a loaded model offers requests.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Positions per sequence.
    pub context: usize,
    /// Whether it has a chat format.
    pub chat: bool,
}

/// The server's life.
#[derive(Debug, Clone)]
pub enum Phase {
    /// The model is being loaded.
    Loading,
    /// Serving.
    Ready(Ready),
    /// Loading or serving failed (the message); the server exits.
    Failed(String),
}

/// Shared between the HTTP handlers and the engine thread.
pub struct Shared {
    phase: Mutex<Phase>,
    changed: watch::Sender<()>,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
}

impl Shared {
    /// Loading, with fresh counters.
    pub fn new() -> Shared {
        Shared {
            phase: Mutex::new(Phase::Loading),
            changed: watch::channel(()).0,
            metrics: Metrics::default(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.lock().clone()
    }

    /// The model is ready.
    pub fn set_ready(&self, r: Ready) {
        *self.phase.lock() = Phase::Ready(r);
        self.changed.send_replace(());
    }

    /// Loading or serving failed.
    pub fn set_failed(&self, why: String) {
        // Said once, by whoever ends the process with it (`rabbit serve` prints it and exits 1).
        tracing::debug!("{why}");
        *self.phase.lock() = Phase::Failed(why);
        self.changed.send_replace(());
    }

    /// Notified at every phase change.
    pub fn watch(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}
