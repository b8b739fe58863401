//! `rabbit split`: checkpoint → per-layer files, and `--verify`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rabbit_split::{SplitEvent, SplitOptions, SplitOutcome};

use crate::out::{note, outln};
use crate::report::human_bytes;

/// Arguments of `rabbit split`.
#[derive(Args)]
pub struct SplitArgs {
    /// Local HF checkpoint directory to split.
    #[arg(long, required_unless_present = "verify", conflicts_with = "verify")]
    model: Option<PathBuf>,
    /// Output directory (default: `<model>/rabbit-split`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Delete the original weight files once the split is verified complete.
    #[arg(long)]
    delete_original: bool,
    /// Compress the decoder layers' linear weights block-wise: 4bit (NF4) or 8bit.
    #[arg(long, value_name = "4bit|8bit", conflicts_with = "verify")]
    compression: Option<rabbit_split::Compression>,
    /// With --compression, compress the embedding and LM head too.
    #[arg(long, requires = "compression")]
    compress_embeddings: bool,
    /// Check sizes and checksums of an existing split directory and name any damaged file.
    #[arg(long, value_name = "SPLIT_DIR")]
    verify: Option<PathBuf>,
}

/// Runs `rabbit split`.
pub fn run(a: SplitArgs) -> Result<()> {
    if let Some(dir) = a.verify {
        let report =
            rabbit_split::verify(&dir).with_context(|| format!("verifying {}", dir.display()))?;
        if report.is_ok() {
            outln!(
                "{}: OK ({} files, {} checked)",
                dir.display(),
                report.files_checked,
                human_bytes(report.bytes_checked)
            )?;
            return Ok(());
        }
        for d in &report.damaged {
            note!("damaged: {d}");
        }
        let originals_gone = rabbit_split::Manifest::load(&dir)
            .map(|m| m.original_deleted)
            .unwrap_or(false);
        bail!(
            "{}: {} damaged file(s); {}",
            dir.display(),
            report.damaged.len(),
            if originals_gone {
                "the original weights were deleted after splitting, so the split cannot be \
                 repaired from them: download the checkpoint again and rerun `rabbit split --model <checkpoint>`"
            } else {
                "rerun `rabbit split --model <checkpoint>` to repair (only the damaged files are rewritten)"
            }
        );
    }
    let model = a.model.expect("clap enforces --model without --verify");
    let spec = rabbit_models::load_spec(&model)?;
    let compression = a.compression;
    let opts = SplitOptions {
        out_dir: a.out,
        delete_original: a.delete_original,
        compression,
        compress_embeddings: a.compress_embeddings,
        ..SplitOptions::default()
    };
    let started = std::time::Instant::now();
    let (dir, outcome) = rabbit_split::split(&model, &spec.layout(), &opts, &mut |e| match e {
        SplitEvent::Planned {
            units,
            bytes,
            already_done,
        } => note!(
            "splitting {} into {units} files ({} to write{})",
            model.display(),
            human_bytes(*bytes),
            if *already_done > 0 {
                format!(", {already_done} kept from an interrupted run")
            } else {
                String::new()
            }
        ),
        SplitEvent::UnitDone {
            index, total, name, ..
        } => note!("  [{}/{total}] {name}", index + 1),
        SplitEvent::Verified => note!("split verified"),
        SplitEvent::OriginalDeleted { files } => {
            note!("deleted {files} original weight file(s)")
        }
        SplitEvent::Reused => {}
    })
    .with_context(|| format!("splitting {}", model.display()))?;
    match outcome {
        SplitOutcome::Reused => outln!("{}: split is current, reused", dir.display())?,
        SplitOutcome::Written {
            bytes_written,
            units_written,
            units_resumed,
        } => outln!(
            "{}: wrote {units_written} files ({}){} in {:.2} s",
            dir.display(),
            human_bytes(bytes_written),
            if units_resumed > 0 {
                format!(", resumed {units_resumed}")
            } else {
                String::new()
            },
            started.elapsed().as_secs_f64()
        )?,
    }
    Ok(())
}
