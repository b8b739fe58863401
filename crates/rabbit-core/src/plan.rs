//! The residency planner: given memory budgets, decide which decoder layers stay resident on the
//! compute device (never re-streamed) and which stream from disk every sweep.
//!
//! Order of preference: the embedding, final norm and LM head first (needed every sweep, small
//! per byte of benefit), then as many decoder layers as fit, in execution order, after reserving
//! the KV cache, activations and the streaming staging buffers.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{CoreError, Result};

/// A byte size from the command line: plain bytes or with a KiB/MiB/GiB/TiB (binary) or
/// KB/MB/GB/TB (decimal) suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" | "k" => 1 << 10,
            "mib" | "m" => 1 << 20,
            "gib" | "g" => 1 << 30,
            "tib" | "t" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            other => {
                return Err(CoreError::InvalidInput(format!(
                "size `{s}`: unknown unit `{other}` (use bytes or KiB/MiB/GiB/TiB or KB/MB/GB/TB)"
            )))
            }
        };
        let value: f64 = num.trim().parse().map_err(|_| {
            CoreError::InvalidInput(format!("size `{s}` is not a number with an optional unit"))
        })?;
        if !(value >= 0.0 && value.is_finite()) {
            return Err(CoreError::InvalidInput(format!(
                "size `{s}` must be a non-negative number"
            )));
        }
        Ok(ByteSize((value * mult as f64) as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&rabbit_split::error::human_bytes(self.0))
    }
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
    /// Embedding + final norm + LM head bytes (always resident in this version).
    pub head_bytes: u64,
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
    /// KV cache for the expected batch and context.
    pub kv_bytes: u64,
    /// Activations for the expected batch and context.
    pub activation_bytes: u64,
    /// Layers read ahead when streaming.
    pub prefetch_depth: usize,
    /// Context length (tokens per sequence) the KV cache and activations are sized for.
    pub context: usize,
}

/// Chooses resident layers greedily in execution order within the budget. With no budget given,
/// the budget is half the host's free memory (the rest is left to the page cache, which is what
/// makes re-streaming from "disk" fast).
pub fn make_plan(inputs: &PlanInputs, budget: MemoryBudget) -> Result<Plan> {
    let max_layer = inputs.layer_bytes.iter().copied().max().unwrap_or(0);
    let staging = (inputs.prefetch_depth.max(1) as u64 + 1) * max_layer;
    if let Some(n) = budget.resident_layers {
        let n = n.min(inputs.layer_bytes.len());
        let resident_layer_bytes: u64 = inputs.layer_bytes[..n].iter().sum();
        let streamed: Vec<usize> = (n..inputs.layer_bytes.len()).collect();
        return Ok(Plan {
            device_budget: budget.device.unwrap_or(0),
            budget_derived: false,
            head_bytes: inputs.head_bytes,
            kv_bytes: inputs.kv_bytes,
            activation_bytes: inputs.activation_bytes,
            staging_bytes: if streamed.is_empty() { 0 } else { staging },
            resident_layers: (0..n).collect(),
            streamed_bytes_per_sweep: inputs.layer_bytes[n..].iter().sum(),
            streamed_layers: streamed,
            resident_layer_bytes,
        });
    }
    let (device_budget, derived) = match budget.device {
        Some(b) => (b, false),
        None => (host_available().map(|a| a / 2).unwrap_or(0), true),
    };
    let fixed = inputs.head_bytes + inputs.kv_bytes + inputs.activation_bytes;
    if !derived && fixed > device_budget {
        // KV cache and activations grow with the context: say which context would fit.
        let per_token = (inputs.kv_bytes + inputs.activation_bytes) / inputs.context.max(1) as u64;
        let fits = device_budget.saturating_sub(inputs.head_bytes) / per_token.max(1);
        let hint = if fits == 0 {
            "not even one token of context fits next to the embedding/LM head".to_string()
        } else {
            format!("the largest context that fits is about {fits} tokens")
        };
        return Err(CoreError::InvalidInput(format!(
            "--device-memory-budget {} is too small for a {}-token context: embedding/norm/LM head {} + KV cache {} + activations {} need {}; {hint}",
            ByteSize(device_budget),
            inputs.context,
            ByteSize(inputs.head_bytes),
            ByteSize(inputs.kv_bytes),
            ByteSize(inputs.activation_bytes),
            ByteSize(fixed)
        )));
    }
    let total_layers: u64 = inputs.layer_bytes.iter().sum();
    let mut room = device_budget.saturating_sub(fixed);
    // Everything fits: no staging needed at all.
    let all_fit = total_layers <= room;
    if !all_fit {
        room = room.saturating_sub(staging);
    }
    let mut resident = Vec::new();
    let mut streamed = Vec::new();
    let mut resident_bytes = 0u64;
    for (i, &b) in inputs.layer_bytes.iter().enumerate() {
        if all_fit || (streamed.is_empty() && resident_bytes + b <= room) {
            resident.push(i);
            resident_bytes += b;
        } else {
            streamed.push(i);
        }
    }
    let streamed_bytes = streamed.iter().map(|&i| inputs.layer_bytes[i]).sum();
    Ok(Plan {
        device_budget,
        budget_derived: derived,
        head_bytes: inputs.head_bytes,
        kv_bytes: inputs.kv_bytes,
        activation_bytes: inputs.activation_bytes,
        staging_bytes: if streamed.is_empty() { 0 } else { staging },
        resident_layers: resident,
        streamed_layers: streamed,
        resident_layer_bytes: resident_bytes,
        streamed_bytes_per_sweep: streamed_bytes,
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
            kv_bytes: 10,
            activation_bytes: 40,
            prefetch_depth: 2,
            context: 10,
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
}
