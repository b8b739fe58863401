//! Checkpoint splitter: turns a Hugging Face checkpoint (safetensors, or PyTorch `.bin` weights,
//! read without running Python) into one aligned safetensors file per layer unit plus a
//! `manifest.json`, so the executor can fetch a whole decoder layer with a single sequential read
//! and view its tensors in place.
//!
//! Pure Rust (no libtorch), streaming (bounded memory whatever the model size), crash-safe and
//! resumable, and a current split is recognized in milliseconds. The directory format is
//! specified in `docs/FORMAT.md`.
//!
//! ```no_run
//! # fn layout() -> rabbit_split::Layout { unimplemented!() }
//! use rabbit_split::{split, SplitOptions};
//! let (dir, outcome) = split(
//!     std::path::Path::new("/models/qwen2"),
//!     &layout(),
//!     &SplitOptions::default(),
//!     &mut |ev| eprintln!("{ev:?}"),
//! )?;
//! let manifest = rabbit_split::Manifest::load(&dir)?;
//! # Ok::<(), rabbit_split::SplitError>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod in_place;
pub mod integrity;
mod jsonutil;
pub mod layout;
pub mod manifest;
pub mod quant;
mod safetensors_header;
mod split;
#[doc(hidden)]
pub mod testing;
mod torch_bin;
mod torch_globals;
mod torch_pickle;
mod verify;
pub mod writer;

pub use checkpoint::{read_config_json, source_fingerprint, Checkpoint, TensorLoc, WeightFormat};
pub use dtype::Dtype;
pub use error::{Damage, Result, SplitError};
pub use in_place::{plan_in_place, Extent, FileId, FileStamp, InPlace, UnitRegion};
pub use layout::{Layout, UnitKind, UnitSpec};
pub use manifest::{Manifest, QuantizedEntry, SplitSettings, TensorEntry, UnitEntry};
pub use quant::{
    dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4, Compression,
    ParseCompressionError, NF4_CODEBOOK, QUANT_BLOCK,
};
pub use split::{
    default_split_dir, default_split_dir_for, is_current, split, stale_reason, SplitEvent,
    SplitOptions, SplitOutcome, COPY_CHUNK, DEFAULT_ALIGNMENT, DEFAULT_SPLIT_DIR_NAME,
};
pub use verify::{verify, VerifyReport};
pub use writer::{AlignedWriter, TensorHeader, WrittenFile};
