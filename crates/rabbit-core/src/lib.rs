//! The rabbitllm executor: streams a split model one decoder layer at a time through libtorch,
//! with the next layers already being read, a preallocated KV cache on the compute device, and
//! batched generation on a step-level scheduler
//! (sequences join and leave between sweeps, chunked prefill, speculative decoding).
//!
//! The executor works on token ids and a split directory; it needs no tokenizer and no network.
//! Finding models, downloading them and text handling live in the front end (the `rabbitllm`
//! crate, `rabbitllm::AutoModel`).

pub mod bench;
pub mod buffer;
pub mod decoder;
pub mod dequant;
#[cfg(target_arch = "x86_64")]
mod dequant_x86;
pub mod device;
pub mod engine;
pub mod error;
pub mod fp8;
pub mod generate;
pub mod head;
pub mod kv;
pub mod memory;
pub mod mxfp4;
pub mod omp;
pub mod plan;
pub mod qgemv;
#[cfg(target_arch = "x86_64")]
mod qgemv_x86;
pub mod reader;
pub mod rope;
pub mod sampling;
pub mod stats;
pub mod step;
pub mod threads;
pub mod validate;
pub mod weights;

pub use device::{DType, DeviceSpec};
pub use engine::{DecodeCounts, Engine, EngineOptions, ExpertCacheSize, LayerProfile, Profile};
pub use error::{CoreError, Result};
pub use generate::{
    Control, FinishReason, GenerateOutput, GenerateRequest, SequenceOutput, Timings, TokenEvent,
};
pub use plan::{ByteSize, MemoryBudget, Plan};
pub use sampling::SamplingParams;
pub use step::{
    DraftSource, Scheduler, SchedulerOptions, SeqId, SequenceRequest, Speculation, StepReport,
};
pub use threads::Threads;

/// Re-exported so library users can build devices/tensors without a direct tch dependency.
pub use tch;
