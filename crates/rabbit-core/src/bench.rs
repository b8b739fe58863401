//! `rabbit bench` as a library function: a fixed synthetic workload (seeded or given prompt ids,
//! greedy, no early stop) with medians over repetitions, plus the physical floor it is compared
//! with.

use serde::Serialize;

use crate::engine::{Engine, Profile};
use crate::error::{CoreError, Result};
use crate::generate::{Control, GenerateRequest, Timings};
use crate::kv::KvCache;
use crate::memory::{peak_anon, peak_rss};
use crate::plan::host_available;
use crate::reader::{measure_regions, ReadMode};
use crate::sampling::SamplingParams;
use crate::stats::median;
use crate::step::Speculation;

/// The workload.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    /// Sequences per batch.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// New tokens per sequence.
    pub new_tokens: usize,
    /// Repetitions (medians are reported).
    pub repeat: usize,
    /// Drop streamed layers from the page cache after use: every sweep reads the disk, as for a
    /// model larger than RAM.
    pub cold: bool,
    /// Seed of the prompt ids.
    pub seed: u64,
    /// Explicit prompt ids, one sequence each (then `batch`/`prompt_len`/`seed` are not used to
    /// make them), e.g. to run the same prompt as another engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_ids: Option<Vec<Vec<u32>>>,
    /// Longest prompt chunk per sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_chunk: Option<usize>,
    /// Speculative decoding (a draft model goes to [`run_with_draft`]).
    pub speculation: Speculation,
    /// Sample at this temperature (seeded with `seed`) instead of greedy decoding: a random
    /// model's greedy output soon repeats itself, which makes every token route alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// The expert cache at the end of a bench run.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertCacheReport {
    /// Its budget.
    pub budget_bytes: u64,
    /// Bytes it held.
    pub used_bytes: u64,
    /// Bytes of every streamed expert (what a budget holding them all would need).
    pub expert_bytes: u64,
}

/// What one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The workload.
    pub config: BenchConfig,
    /// Median decode sweep (one token for each of `batch` sequences).
    pub decode_s_per_token: f64,
    /// Median prefill throughput.
    pub prefill_tokens_per_s: f64,
    /// Median prefill time: the prompt sweep plus choosing the first token (time to first token).
    pub prefill_s: f64,
    /// Time to load the model (split reused or made, plan, resident weights), when the caller
    /// measured it.
    pub load_s: Option<f64>,
    /// The greedy tokens of the first repetition, one list per sequence.
    pub output_ids: Vec<Vec<u32>>,
    /// Peak RSS of the process (bytes): includes file pages mapped (resident weights viewed in
    /// place, streamed layers whose mappings are kept).
    pub peak_memory_bytes: u64,
    /// Peak of the process's own memory (RSS without file pages), sampled after every sweep.
    pub peak_anon_bytes: Option<u64>,
    /// Bytes of streamed layers kept mapped between sweeps at the end of the run.
    pub kept_mapped_bytes: u64,
    /// The intra-op thread policy (`auto` or a count).
    pub threads: String,
    /// Mean intra-op thread count the layers ran with (so far in this process).
    pub mean_threads: Option<f64>,
    /// Bytes of layer files read per decode sweep.
    pub bytes_streamed_per_token: u64,
    /// Bytes per decode sweep that the routing implies for the streamed layers (dense parts
    /// and routed experts, cached or not), when sparse layers stream by expert.
    pub active_bytes_per_token: Option<u64>,
    /// Share of routed experts found in the expert cache during decode (mixtures of experts
    /// streamed by expert).
    pub expert_hit_rate: Option<f64>,
    /// The expert cache's budget and what it held at the end (bytes), and the bytes of every
    /// streamed expert.
    pub expert_cache: Option<ExpertCacheReport>,
    /// Sequential read bandwidth of the same files through the same path, measured separately.
    pub read_bytes_per_s: f64,
    /// `bytes_streamed_per_token / read_bytes_per_s`: the I/O floor of one decode sweep.
    pub io_floor_s_per_token: f64,
    /// Compute-only time of one decode sweep (from a fully resident run), when measured.
    pub compute_s_per_token: Option<f64>,
    /// `max(io floor, compute)`, when compute was measured.
    pub floor_s_per_token: Option<f64>,
    /// `decode_s_per_token / floor_s_per_token` (1.0 = at the physical limit).
    pub ratio_to_floor: Option<f64>,
    /// Layers resident / streamed.
    pub resident_layers: usize,
    /// Layers streamed each sweep.
    pub streamed_layers: usize,
    /// The layers streamed straight from the checkpoint's files (no split).
    pub in_place: bool,
    /// Stage timings of the last repetition.
    pub profile: Profile,
    /// The generate timings of the last repetition (sweeps, drafts, acceptance).
    pub timings: Timings,
    /// The draft model's stage timings of the last repetition, when one drafted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_profile: Option<Profile>,
}

/// Deterministic prompt ids below `limit`.
fn prompt_ids(seed: u64, seq: usize, len: usize, limit: u32) -> Vec<u32> {
    let mut x = seed ^ (seq as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % limit as u64) as u32
        })
        .collect()
}

/// Refuses a workload that cannot fit before building it (a `--batch 100000000` would otherwise
/// allocate its prompt ids first and abort the process).
fn check_size(engine: &Engine, cfg: &BenchConfig) -> Result<()> {
    let spec = engine.spec();
    let context = cfg.prompt_len.saturating_add(cfg.new_tokens);
    if spec.context_limit().is_some_and(|limit| context > limit) {
        return Err(CoreError::ContextTooLong {
            reason: format!(
                "{} {} + --new-tokens {} = {context} > max_position_embeddings {}",
                if cfg.prompt_ids.is_some() {
                    "the longest sequence of --prompt-ids-file,"
                } else {
                    "--prompt-len"
                },
                cfg.prompt_len,
                cfg.new_tokens,
                spec.max_position_embeddings
            ),
        });
    }
    let elem = engine.kind().elt_size_in_bytes();
    let kv = KvCache::bytes(spec.num_layers, cfg.batch, &spec.kv_shape(), context, elem);
    // Prompt ids, positions and their i64 copies are built on the host on every device.
    let host_ids = (cfg.batch as u64)
        .saturating_mul(context as u64)
        .saturating_mul(20);
    if let Some(free) = host_available() {
        if host_ids > free {
            return Err(CoreError::InvalidInput(format!(
                "--batch {} x {context} positions needs {} of host memory for the token ids alone, more than the {} free",
                cfg.batch,
                rabbit_split::error::human_bytes(host_ids),
                rabbit_split::error::human_bytes(free)
            )));
        }
    }
    if engine.device() == tch::Device::Cpu {
        if let Some(free) = host_available() {
            if kv > free {
                return Err(CoreError::InvalidInput(format!(
                    "--batch {} x {context} positions needs a KV cache of {}, more than the {} of free memory",
                    cfg.batch,
                    rabbit_split::error::human_bytes(kv),
                    rabbit_split::error::human_bytes(free)
                )));
            }
        }
    }
    Ok(())
}

/// Runs the workload `repeat` times on `engine` and measures the read floor of its streamed
/// layers. `token_limit` bounds the prompt ids (e.g. the tokenizer's size).
pub fn run(engine: &mut Engine, cfg: &BenchConfig, token_limit: u32) -> Result<BenchReport> {
    run_with_draft(engine, None, cfg, token_limit)
}

/// [`run`] with a draft model for speculative decoding.
pub fn run_with_draft(
    engine: &mut Engine,
    mut draft: Option<&mut Engine>,
    cfg: &BenchConfig,
    token_limit: u32,
) -> Result<BenchReport> {
    if cfg.batch == 0 || cfg.prompt_len == 0 || cfg.new_tokens < 2 || cfg.repeat == 0 {
        return Err(CoreError::InvalidInput(
            "bench needs --batch >= 1, --prompt-len >= 1, --new-tokens >= 2 and --repeat >= 1"
                .into(),
        ));
    }
    check_size(engine, cfg)?;
    let sequences = match &cfg.prompt_ids {
        Some(given) => given.clone(),
        None => (0..cfg.batch)
            .map(|i| {
                prompt_ids(
                    cfg.seed,
                    i,
                    cfg.prompt_len,
                    token_limit.min(engine.spec().vocab_size as u32).max(1),
                )
            })
            .collect(),
    };
    let req = GenerateRequest {
        sequences,
        max_new_tokens: cfg.new_tokens,
        sampling: match cfg.temperature {
            Some(t) => SamplingParams {
                temperature: t,
                seed: cfg.seed,
                ..SamplingParams::default()
            },
            None => SamplingParams::default(),
        },
        eos_token_ids: vec![],
        keep_logits: false,
        prefill_chunk: cfg.prefill_chunk,
        speculation: cfg.speculation.clone(),
    };
    engine.validate_request(&req)?;
    engine.set_evict_after_use(cfg.cold);
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    let mut prefill_s = Vec::new();
    let mut output_ids = Vec::new();
    let mut bytes_per_token = 0;
    let mut active_per_token = None;
    let mut timings = Timings::default();
    for rep in 0..cfg.repeat {
        engine.reset_profile();
        if let Some(d) = draft.as_deref_mut() {
            d.reset_profile();
        }
        let out =
            engine.generate_with_draft(&req, draft.as_deref_mut(), &mut |_| Control::Continue)?;
        decode.push(out.timings.decode_s_per_token);
        prefill.push(out.timings.prefill_tokens_per_s);
        prefill_s.push(out.timings.prefill_s);
        if rep == 0 {
            output_ids = out.sequences.iter().map(|s| s.output_ids.clone()).collect();
        }
        let d = engine.profile.decode;
        bytes_per_token = d
            .bytes_streamed
            .checked_div(d.sweeps)
            .unwrap_or(engine.profile.bytes_streamed / (out.timings.sweeps as u64).max(1));
        active_per_token = (d.sweeps > 0 && d.expert_loads > 0).then(|| d.active_bytes / d.sweeps);
        timings = out.timings;
    }
    engine.set_evict_after_use(false);
    let plan = engine.plan().clone();
    let units: Vec<_> = plan
        .streamed_layers
        .iter()
        .map(|&i| &engine.layer_regions()[i])
        .collect();
    // Cold: the disk's own rate, with O_DIRECT (pages the reader still has mapped, its
    // read-ahead, cannot be dropped from the page cache and would be measured as cached).
    let mode = if cfg.cold {
        ReadMode::Direct
    } else {
        engine.read_mode()
    };
    let (read_bytes_per_s, io_floor) = if units.is_empty() {
        (0.0, 0.0)
    } else {
        // Median of three passes, like the decode figures.
        let mut rates = Vec::new();
        for _ in 0..3 {
            let (bytes, secs) = measure_regions(&units, mode, cfg.cold)?;
            rates.push(bytes as f64 / secs.max(1e-9));
        }
        let rate = median(&rates);
        (rate, bytes_per_token as f64 / rate)
    };
    let threads = crate::threads::report();
    Ok(BenchReport {
        config: cfg.clone(),
        decode_s_per_token: median(&decode),
        prefill_tokens_per_s: median(&prefill),
        prefill_s: median(&prefill_s),
        load_s: None,
        output_ids,
        peak_memory_bytes: peak_rss().unwrap_or(0),
        peak_anon_bytes: peak_anon(),
        kept_mapped_bytes: engine.kept_mapped_bytes(),
        threads: threads.map(|t| t.0.to_string()).unwrap_or_default(),
        mean_threads: threads.and_then(|t| t.2),
        bytes_streamed_per_token: bytes_per_token,
        active_bytes_per_token: active_per_token,
        expert_hit_rate: engine.profile.expert_hit_rate(),
        expert_cache: engine
            .expert_cache()
            .map(
                |(budget_bytes, used_bytes, expert_bytes)| ExpertCacheReport {
                    budget_bytes,
                    used_bytes,
                    expert_bytes,
                },
            ),
        read_bytes_per_s,
        io_floor_s_per_token: io_floor,
        compute_s_per_token: None,
        floor_s_per_token: None,
        ratio_to_floor: None,
        resident_layers: plan.resident_layers.len(),
        streamed_layers: plan.streamed_layers.len(),
        in_place: engine.streams_in_place(),
        profile: engine.profile.clone(),
        timings,
        draft_profile: draft.map(|d| d.profile.clone()),
    })
}

impl BenchReport {
    /// Adds the compute-only figure (from a fully resident run of the same workload) and the
    /// derived floor.
    pub fn with_compute_baseline(mut self, compute_s_per_token: f64) -> Self {
        let floor = compute_s_per_token.max(self.io_floor_s_per_token);
        self.compute_s_per_token = Some(compute_s_per_token);
        self.floor_s_per_token = Some(floor);
        self.ratio_to_floor = Some(self.decode_s_per_token / floor);
        self
    }
}
