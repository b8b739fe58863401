//! How sizes and the residency plan read on the terminal, shared by every subcommand.

use rabbit_core::plan::Plan;

/// `1234567` → `1.2 MiB`: compact, for status lines (errors carry exact byte counts too).
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// How the plan placed the embedding and LM head when they did not fit on the device.
pub fn head_note(plan: &Plan) -> String {
    let mut parts = Vec::new();
    if plan.embedding_on_host {
        parts.push("embedding lookup on the host".to_string());
    }
    if let Some(c) = plan.lm_head_chunk_bytes {
        parts.push(format!(
            "LM head streamed every token in chunks of {}",
            human_bytes(c)
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// The one-line summary of a plan printed when a model opens.
pub fn plan_line(p: &Plan) -> String {
    let dense = if p.dense_resident_layers.is_empty() {
        String::new()
    } else {
        format!(
            " (of which {} keep their dense parts resident, {}: only their routed experts are read)",
            p.dense_resident_layers.len(),
            human_bytes(p.dense_resident_bytes)
        )
    };
    format!(
        "plan: {} layers resident ({}), {} streamed ({} per sweep){dense}{}; {}",
        p.resident_layers.len(),
        human_bytes(p.resident_layer_bytes),
        p.streamed_layers.len(),
        human_bytes(p.streamed_bytes_per_sweep),
        head_note(p),
        if p.budget_derived {
            format!(
                "budget {} (half of free memory)",
                human_bytes(p.device_budget)
            )
        } else if p.device_budget == 0 {
            "set by --resident-layers".to_string()
        } else {
            format!("budget {}", human_bytes(p.device_budget))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
