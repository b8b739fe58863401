//! The residency planner: given memory budgets, decide which decoder layers stay resident on the
//! compute device (never re-streamed) and which stream from disk every sweep.
//!
//! Order of preference: the embedding, final norm and LM head first (needed every sweep, small
//! per byte of benefit), then as many decoder layers as fit, in execution order, after reserving
//! the KV cache, activations and the streaming staging buffers. When even the embedding and LM
//! head do not fit (a 70B model on a 4 GB card), the embedding lookup moves to the host (rows
//! gathered from the mapped split file) and, if that is not enough, the LM head streams from the
//! split in chunks every sweep (see [`crate::head`]).

use serde::Serialize;

use crate::error::{CoreError, Result};

/// A byte size (`4GiB`, `3500MB`, `512 MiB`, plain bytes): re-exported so callers parse budgets
/// the same way the planner reports them.
pub use bytesize::ByteSize;

/// `1.5 GiB (1610612736 bytes)`: exact figures in error messages.
fn exact(n: u64) -> String {
    rabbit_split::error::human_bytes(n)
}

/// Memory the caller allows the engine to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes of compute-device memory (host RAM on CPU) for resident weights, KV cache and
    /// activations. `None`: derived from free memory.
    pub device: Option<u64>,
    /// Keep exactly the first N decoder layers resident (0 streams every layer), overriding the
    /// budget arithmetic.
    pub resident_layers: Option<usize>,
}

/// Where each part of the model lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The device budget the plan was made for.
    pub device_budget: u64,
    /// Whether the budget was derived from free memory (rather than given).
    pub budget_derived: bool,
    /// Embedding + final norm + LM head bytes on the device (what of them stays resident).
    pub head_bytes: u64,
    /// The embedding lookup runs on the host, from the mapped split file.
    pub embedding_on_host: bool,
    /// The LM head streams from the split file every sweep, in chunks of this many bytes (in the
    /// compute dtype); `None`: resident.
    pub lm_head_chunk_bytes: Option<u64>,
    /// KV cache bytes reserved.
    pub kv_bytes: u64,
    /// Activation allowance.
    pub activation_bytes: u64,
    /// Host buffers for streaming (depth + 1 largest layers), when any layer streams.
    pub staging_bytes: u64,
    /// Decoder layers kept resident.
    pub resident_layers: Vec<usize>,
    /// Decoder layers streamed every sweep.
    pub streamed_layers: Vec<usize>,
    /// Bytes of the resident layers.
    pub resident_layer_bytes: u64,
    /// Bytes read per sweep (the streamed layers).
    pub streamed_bytes_per_sweep: u64,
    /// Streamed sparse layers whose dense part (norms, attention, router, shared expert) is
    /// kept resident, only their routed experts read (set when the engine opens, where the
    /// budget leaves room for them).
    #[serde(default)]
    pub dense_resident_layers: Vec<usize>,
    /// Bytes of those dense parts.
    #[serde(default)]
    pub dense_resident_bytes: u64,
}

/// Free memory on the host (MemAvailable), if readable.
pub fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Inputs of [`make_plan`] that describe the model.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    /// Bytes of each decoder layer in the compute dtype.
    pub layer_bytes: Vec<u64>,
    /// Embedding + final norm + LM head in the compute dtype.
    pub head_bytes: u64,
    /// Of `head_bytes`: the embedding (0 when it cannot leave the device, e.g. compressed).
    pub embed_bytes: u64,
    /// Of `head_bytes`: the LM head's own matrix (0 when tied to the embedding, or when it
    /// cannot stream).
    pub lm_head_bytes: u64,
    /// The LM head is the embedding matrix: moving one moves both.
    pub tied: bool,
    /// KV cache for the expected batch and context.
    pub kv_bytes: u64,
    /// Activations for the expected batch and context.
    pub activation_bytes: u64,
    /// Layers read ahead when streaming.
    pub prefetch_depth: usize,
    /// Context length (tokens per sequence) the KV cache and activations are sized for.
    pub context: usize,
    /// Per layer: the bytes of its dense part when it is a sparse layer whose routed experts
    /// can stream on their own (0 otherwise; empty: none). A layer that streams then needs
    /// staging for its dense part only, and the dense parts can stay resident by themselves.
    pub dense_bytes: Vec<u64>,
}

/// Where the embedding and LM head go for a budget.
struct HeadPlacement {
    /// Bytes of embedding/norm/LM head left on the device.
    device_bytes: u64,
    embedding_on_host: bool,
    /// LM head chunk bytes when it streams.
    chunk: Option<u64>,
}

impl HeadPlacement {
    fn describe(&self) -> String {
        match (self.embedding_on_host, self.chunk) {
            (false, None) => String::new(),
            (true, None) => " (embedding on the host)".into(),
            (e, Some(c)) => format!(
                " ({}LM head streamed in chunks of {})",
                if e { "embedding on the host, " } else { "" },
                exact(c)
            ),
        }
    }
}

/// Smallest and largest LM-head chunk: small chunks waste the matmul's efficiency, large ones
/// the budget.
const MIN_HEAD_CHUNK: u64 = 16 << 20;
const MAX_HEAD_CHUNK: u64 = 256 << 20;

/// Keeps the embedding and LM head on the device when they fit next to the KV cache and
/// activations; otherwise moves the embedding lookup to the host first (cheap: a few rows per
/// token), then streams the LM head in chunks (a full read of it every sweep). A tied matrix
/// serves both, so it moves as one.
fn place_head(inputs: &PlanInputs, budget: u64) -> HeadPlacement {
    let others = inputs.kv_bytes + inputs.activation_bytes;
    let mut p = HeadPlacement {
        device_bytes: inputs.head_bytes,
        embedding_on_host: false,
        chunk: None,
    };
    if p.device_bytes + others <= budget || inputs.embed_bytes == 0 {
        return p;
    }
    let stream = |p: &mut HeadPlacement, matrix: u64| {
        p.device_bytes -= matrix;
        let room = budget.saturating_sub(p.device_bytes + others);
        // Small matrices (tests, tiny models) may go in quarters.
        let min = MIN_HEAD_CHUNK.min(matrix / 4).max(1);
        p.chunk = Some((room / 2).clamp(min, MAX_HEAD_CHUNK).min(matrix.max(1)));
    };
    p.embedding_on_host = true;
    if inputs.tied {
        stream(&mut p, inputs.embed_bytes);
        return p;
    }
    p.device_bytes -= inputs.embed_bytes;
    if p.device_bytes + others > budget && inputs.lm_head_bytes > 0 {
        stream(&mut p, inputs.lm_head_bytes);
    }
    p
}

/// Chooses resident layers greedily in execution order within the budget. With no budget given,
/// the budget is half the host's free memory (the rest is left to the page cache, which is what
/// makes re-streaming from "disk" fast).
pub fn make_plan(inputs: &PlanInputs, budget: MemoryBudget) -> Result<Plan> {
    let dense = |i: usize| inputs.dense_bytes.get(i).copied().unwrap_or(0);
    // What the layer reader brings of a streamed layer: a sparse layer's dense part, or all.
    let max_read = (0..inputs.layer_bytes.len())
        .map(|i| match dense(i) {
            0 => inputs.layer_bytes[i],
            d => d,
        })
        .max()
        .unwrap_or(0);
    let staging = (inputs.prefetch_depth.max(1) as u64 + 1) * max_read;
    if let Some(n) = budget.resident_layers {
        let n = n.min(inputs.layer_bytes.len());
        let resident_layer_bytes: u64 = inputs.layer_bytes[..n].iter().sum();
        let streamed: Vec<usize> = (n..inputs.layer_bytes.len()).collect();
        return Ok(Plan {
            device_budget: budget.device.unwrap_or(0),
            budget_derived: false,
            head_bytes: inputs.head_bytes,
            embedding_on_host: false,
            lm_head_chunk_bytes: None,
            kv_bytes: inputs.kv_bytes,
            activation_bytes: inputs.activation_bytes,
            staging_bytes: if streamed.is_empty() { 0 } else { staging },
            resident_layers: (0..n).collect(),
            streamed_bytes_per_sweep: inputs.layer_bytes[n..].iter().sum(),
            streamed_layers: streamed,
            resident_layer_bytes,
            dense_resident_layers: vec![],
            dense_resident_bytes: 0,
        });
    }
    let (device_budget, derived) = match budget.device {
        Some(b) => (b, false),
        None => (host_available().map(|a| a / 2).unwrap_or(0), true),
    };
    let head = place_head(inputs, device_budget);
    let fixed =
        head.device_bytes + head.chunk.unwrap_or(0) + inputs.kv_bytes + inputs.activation_bytes;
    if !derived && fixed > device_budget {
        // KV cache and activations grow with the context: say which context would fit.
        let per_token = (inputs.kv_bytes + inputs.activation_bytes) / inputs.context.max(1) as u64;
        let fits = device_budget.saturating_sub(head.device_bytes + head.chunk.unwrap_or(0))
            / per_token.max(1);
        let hint = if fits == 0 {
            "not even one token of context fits next to the embedding/LM head".to_string()
        } else {
            format!("the largest context that fits is about {fits} tokens")
        };
        return Err(CoreError::InvalidInput(format!(
            "--device-memory-budget {} is too small for a {}-token context: embedding/norm/LM head {}{} + KV cache {} + activations {} need {}; {hint}",
            exact(device_budget),
            inputs.context,
            exact(head.device_bytes + head.chunk.unwrap_or(0)),
            head.describe(),
            exact(inputs.kv_bytes),
            exact(inputs.activation_bytes),
            exact(fixed)
        )));
    }
    let total_layers: u64 = inputs.layer_bytes.iter().sum();
    let mut room = device_budget.saturating_sub(fixed);
    // Everything fits: no staging needed at all.
    let all_fit = total_layers <= room;
    if !all_fit {
        room = room.saturating_sub(staging);
    }
    // The dense parts of sparse layers first (small, used by every token: a layer that then
    // streams reads only its routed experts), when they all fit; then whole layers in order.
    let dense_total: u64 = inputs.dense_bytes.iter().sum();
    let keep_dense = !all_fit && dense_total > 0 && dense_total <= room;
    if keep_dense {
        room -= dense_total;
    }
    let mut resident = Vec::new();
    let mut streamed = Vec::new();
    let mut resident_bytes = 0u64;
    let mut used = 0u64;
    for (i, &b) in inputs.layer_bytes.iter().enumerate() {
        // A layer made resident whole no longer needs its dense part held apart.
        let cost = if keep_dense { b - dense(i).min(b) } else { b };
        if all_fit || (streamed.is_empty() && used + cost <= room) {
            resident.push(i);
            resident_bytes += b;
            used += cost;
        } else {
            streamed.push(i);
        }
    }
    let streamed_bytes = streamed.iter().map(|&i| inputs.layer_bytes[i]).sum();
    let dense_resident: Vec<usize> = if keep_dense {
        streamed.iter().copied().filter(|&i| dense(i) > 0).collect()
    } else {
        vec![]
    };
    let dense_resident_bytes = dense_resident.iter().map(|&i| dense(i)).sum();
    Ok(Plan {
        device_budget,
        budget_derived: derived,
        head_bytes: head.device_bytes,
        embedding_on_host: head.embedding_on_host,
        lm_head_chunk_bytes: head.chunk,
        kv_bytes: inputs.kv_bytes,
        activation_bytes: inputs.activation_bytes,
        staging_bytes: if streamed.is_empty() { 0 } else { staging },
        resident_layers: resident,
        streamed_layers: streamed,
        resident_layer_bytes: resident_bytes,
        streamed_bytes_per_sweep: streamed_bytes,
        dense_resident_layers: dense_resident,
        dense_resident_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("1.5 GiB".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert_eq!("2GB".parse::<ByteSize>().unwrap().0, 2_000_000_000);
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        let e = "3 parsecs".parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains("parsecs"), "{e}");
        assert!("-1GiB".parse::<ByteSize>().is_err());
    }

    fn inputs(layers: usize) -> PlanInputs {
        PlanInputs {
            layer_bytes: vec![100; layers],
            head_bytes: 50,
            embed_bytes: 0,
            lm_head_bytes: 0,
            tied: false,
            kv_bytes: 10,
            activation_bytes: 40,
            prefetch_depth: 2,
            context: 10,
            dense_bytes: vec![],
        }
    }

    #[test]
    fn zero_room_streams_everything() {
        let p = make_plan(
            &inputs(4),
            MemoryBudget {
                device: Some(100),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(p.resident_layers.is_empty());
        assert_eq!(p.streamed_layers, vec![0, 1, 2, 3]);
        assert_eq!(p.streamed_bytes_per_sweep, 400);
    }

    #[test]
    fn partial_residency_keeps_a_prefix_and_reserves_staging() {
        // 100 fixed + 300 staging leaves 200 for two resident layers.
        let p = make_plan(
            &inputs(8),
            MemoryBudget {
                device: Some(600),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.resident_layers, vec![0, 1]);
        assert_eq!(p.streamed_layers, (2..8).collect::<Vec<_>>());
        assert_eq!(p.staging_bytes, 300);
    }

    #[test]
    fn everything_fits_without_staging() {
        let p = make_plan(
            &inputs(4),
            MemoryBudget {
                device: Some(500),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.resident_layers, vec![0, 1, 2, 3]);
        assert!(p.streamed_layers.is_empty());
        assert_eq!(p.staging_bytes, 0);
    }

    #[test]
    fn explicit_resident_layer_count_wins() {
        let p = make_plan(
            &inputs(4),
            MemoryBudget {
                device: Some(10),
                resident_layers: Some(1),
            },
        )
        .unwrap();
        assert_eq!(p.resident_layers, vec![0]);
        assert_eq!(p.streamed_layers, vec![1, 2, 3]);
        let p = make_plan(
            &inputs(4),
            MemoryBudget {
                resident_layers: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(p.resident_layers.is_empty());
    }

    #[test]
    fn too_small_a_budget_is_an_error_naming_the_option() {
        let e = make_plan(
            &inputs(4),
            MemoryBudget {
                device: Some(10),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--device-memory-budget"), "{e}");
        // 50 bytes of head leave 40 for KV + activations at 5 bytes per token.
        let budget = MemoryBudget {
            device: Some(90),
            ..Default::default()
        };
        let e = make_plan(&inputs(4), budget).unwrap_err().to_string();
        assert!(
            e.contains("largest context that fits is about 8 tokens"),
            "{e}"
        );
    }

    /// A head of 2 x 40 MiB matrices + a norm, 4 layers of 64 MiB, 10 MiB of KV + activations.
    fn big_head(tied: bool) -> PlanInputs {
        let m = 40u64 << 20;
        PlanInputs {
            layer_bytes: vec![64 << 20; 4],
            head_bytes: if tied { m } else { 2 * m } + 4096,
            embed_bytes: m,
            lm_head_bytes: if tied { 0 } else { m },
            tied,
            kv_bytes: 5 << 20,
            activation_bytes: 5 << 20,
            prefetch_depth: 1,
            context: 10,
            dense_bytes: vec![],
        }
    }

    #[test]
    fn the_head_leaves_the_device_only_when_it_must() {
        let plan = |tied, budget: u64| {
            make_plan(
                &big_head(tied),
                MemoryBudget {
                    device: Some(budget),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        // Room for the head: it stays.
        let p = plan(false, 100 << 20);
        assert!(!p.embedding_on_host && p.lm_head_chunk_bytes.is_none());
        // 60 MiB: the embedding goes to the host, the LM head stays.
        let p = plan(false, 60 << 20);
        assert!(p.embedding_on_host && p.lm_head_chunk_bytes.is_none());
        assert_eq!(p.head_bytes, (40 << 20) + 4096);
        // 30 MiB: the LM head streams too, in chunks that fit the rest.
        let p = plan(false, 30 << 20);
        assert!(p.embedding_on_host);
        let chunk = p.lm_head_chunk_bytes.unwrap();
        assert!(((10 << 20)..=MAX_HEAD_CHUNK).contains(&chunk), "{chunk}");
        assert!(p.head_bytes + chunk + (10 << 20) <= 30 << 20);
        assert!(p.resident_layers.is_empty());
        // Tied: one matrix, so both move together.
        let p = plan(true, 45 << 20);
        assert!(p.embedding_on_host && p.lm_head_chunk_bytes.is_some());
        assert_eq!(p.head_bytes, 4096);
        // Far too small even so: the error says what was tried.
        let e = make_plan(
            &big_head(false),
            MemoryBudget {
                device: Some(12 << 20),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("LM head streamed in chunks"), "{e}");
    }
}
