//! Seeded random weights, generated in bounded chunks straight into the safetensors writer.
//!
//! A tensor is cut into chunks of [`CHUNK_ELEMS`] elements. Chunk `c` of tensor `name` draws
//! from a xoshiro256++ generator (its algorithm is fixed here, so the output never changes with
//! a dependency's version) seeded with the `c`-th 32 bytes of the ChaCha8 stream
//! `(seed, fnv1a64(name))`. So a tensor's values depend only on the seed, its name and its
//! distribution — not on the shard layout, the dtype's width, the other tensors or the number of
//! threads — and chunks can be generated in parallel. Each element is the sum of the four 16-bit
//! lanes of one 64-bit draw (Irwin–Hall: a bounded approximation of a normal), scaled to the
//! tensor's mean and std. (Families that share tensor names, e.g. `qwen2` and `llama`, thus get
//! the same values for the same seed and shapes; only the tensors one family alone has differ.)
//!
//! Memory: each generator thread owns two chunk buffers, so at most
//! `2 * threads * CHUNK_ELEMS * 4` bytes (16 MiB for 4 threads of f32) are ever in use,
//! whatever the model size.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use rabbit_split::writer::{AlignedWriter, TensorHeader, WrittenFile};
use rabbit_split::{Dtype, SplitError};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use super::init::{init_for, Init, InitRules};

/// Elements per generated chunk (2 MiB of f32, 1 MiB of bf16).
pub const CHUNK_ELEMS: usize = 1 << 19;
/// Safetensors data alignment of the weight files (what HF's own writer guarantees).
pub const WEIGHT_ALIGNMENT: u64 = 8;
/// Most generator threads used for one file.
pub const MAX_THREADS: usize = 8;

/// xoshiro256++ (Blackman & Vigna), fixed here for reproducibility.
#[derive(Debug, Clone)]
pub struct Xoshiro256pp {
    s: [u64; 4],
}

impl Xoshiro256pp {
    /// The generator of chunk `chunk` of the tensor whose name hashes to `stream`.
    pub fn for_chunk(seed: u64, stream: u64, chunk: u64) -> Self {
        let mut c = ChaCha8Rng::seed_from_u64(seed);
        c.set_stream(stream);
        c.set_word_pos(u128::from(chunk) * 8);
        let mut s = [c.next_u64(), c.next_u64(), c.next_u64(), c.next_u64()];
        if s == [0; 4] {
            s[0] = 1;
        }
        Xoshiro256pp { s }
    }

    /// Next 64 random bits.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// An approximately standard normal value (sum of four uniform 16-bit lanes, standardized).
    /// The reference definition of what [`fill_chunk`] computes.
    #[inline(always)]
    pub fn next_normal(&mut self) -> f32 {
        let r = self.next_u64();
        let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        // Mean 4 * 32767.5, std sqrt(4 * (65536^2 - 1) / 12).
        (sum as f32 - LANES_MEAN) * (1.0 / LANES_STD)
    }
}

const LANES_MEAN: f32 = 131_070.0;
const LANES_STD: f32 = 37_837.227;

/// 64-bit FNV-1a: a stable hash of a tensor name (the stream id of its values).
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Replaces `buf` with the little-endian bytes of the next `n` values of `rng` in `dtype`
/// (F32, BF16 with round-to-nearest-even, or F16).
#[allow(clippy::manual_rotate)] // see the comment on `each_value!`
pub fn fill_chunk(rng: &mut Xoshiro256pp, init: Init, dtype: Dtype, n: usize, buf: &mut Vec<u8>) {
    let esize = dtype.size_bytes();
    buf.clear();
    buf.resize(n * esize, 0);
    let out: &mut [u8] = buf;
    // `sum` of the four lanes maps to `mean + std * (sum - LANES_MEAN) / LANES_STD`.
    let scale = init.std * (1.0 / LANES_STD);
    let offset = init.mean - LANES_MEAN * scale;
    let [mut s0, mut s1, mut s2, mut s3] = rng.s;
    // xoshiro256++ spelt out with plain operators (u128 sums and shift-or rotations instead of
    // method calls), so that unoptimized test builds stay reasonably fast too; the optimizer
    // sees through it.
    macro_rules! each_value {
        (|$v:ident, $j:ident| $body:block) => {{
            let mut $j = 0usize;
            while $j < out.len() {
                let a = (s0 as u128 + s3 as u128) as u64;
                let r = (((a << 23) | (a >> 41)) as u128 + s0 as u128) as u64;
                let t = s1 << 17;
                s2 ^= s0;
                s3 ^= s1;
                s1 ^= s2;
                s0 ^= s3;
                s2 ^= t;
                s3 = (s3 << 45) | (s3 >> 19);
                let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
                let $v = sum as f32 * scale + offset;
                $body
            }
        }};
    }
    match dtype {
        Dtype::F32 => each_value!(|v, j| {
            let b = v.to_bits();
            out[j] = b as u8;
            out[j + 1] = (b >> 8) as u8;
            out[j + 2] = (b >> 16) as u8;
            out[j + 3] = (b >> 24) as u8;
            j += 4;
        }),
        Dtype::BF16 => each_value!(|v, j| {
            // Round to nearest even; the values are always finite.
            let b = v.to_bits();
            let h = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
            out[j] = h as u8;
            out[j + 1] = (h >> 8) as u8;
            j += 2;
        }),
        Dtype::F16 => each_value!(|v, j| {
            let h = half::f16::from_f32(v).to_bits();
            out[j] = h as u8;
            out[j + 1] = (h >> 8) as u8;
            j += 2;
        }),
        other => unreachable!("synthetic weights are never {other}"),
    }
    rng.s = [s0, s1, s2, s3];
}

/// One chunk of one tensor.
#[derive(Debug, Clone, Copy)]
struct Job {
    stream: u64,
    chunk: u64,
    len: usize,
    init: Init,
    /// Elements of this chunk from this index on are zero (embedding/LM-head rows past the
    /// tokenizer's vocabulary, like the padding rows of real Qwen checkpoints: their logits stay
    /// at 0 and are never chosen over real tokens, so generated ids always decode).
    zero_from: usize,
}

impl Job {
    fn run(&self, seed: u64, dtype: Dtype, buf: &mut Vec<u8>) {
        let mut rng = Xoshiro256pp::for_chunk(seed, self.stream, self.chunk);
        fill_chunk(&mut rng, self.init, dtype, self.len, buf);
        if self.zero_from < self.len {
            buf[self.zero_from * dtype.size_bytes()..].fill(0);
        }
    }
}

/// The chunks of a list of tensors, in file order.
fn jobs(tensors: &[(String, Vec<usize>)], rules: &InitRules, live_rows: usize) -> Vec<Job> {
    let mut out = Vec::new();
    for (name, shape) in tensors {
        let init = init_for(rules, name, shape);
        let stream = fnv1a64(name);
        let total: u64 = shape.iter().map(|&d| d as u64).product();
        let live = rules.live_elements(name, total, live_rows);
        let mut left = total;
        let mut chunk = 0;
        while left > 0 {
            let len = left.min(CHUNK_ELEMS as u64) as usize;
            let start = total - left;
            out.push(Job {
                stream,
                chunk,
                len,
                init,
                zero_from: live.saturating_sub(start).min(len as u64) as usize,
            });
            left -= len as u64;
            chunk += 1;
        }
    }
    out
}

/// The bytes of one whole tensor (for tests and small tools; writers stream instead).
pub fn tensor_bytes(
    seed: u64,
    name: &str,
    shape: &[usize],
    rules: &InitRules,
    live_rows: usize,
    dtype: Dtype,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for job in jobs(&[(name.to_string(), shape.to_vec())], rules, live_rows) {
        job.run(seed, dtype, &mut buf);
        out.extend_from_slice(&buf);
    }
    out
}

/// One weight file to write.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// File name inside the checkpoint directory.
    pub file_name: String,
    /// Tensors in file order: name and shape.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Bytes of tensor data.
    pub data_bytes: u64,
}

/// HF shard file name: `model-00001-of-00003.safetensors` (`model.safetensors` when alone).
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Splits the tensors, in order, into `shards` non-empty runs of roughly equal byte size.
/// `shards` must be between 1 and the number of tensors.
pub fn plan_shards(tensors: &[(String, Vec<usize>)], esize: u64, shards: usize) -> Vec<ShardPlan> {
    let n = tensors.len();
    assert!(shards >= 1 && shards <= n, "caller checks the shard count");
    let size = |shape: &[usize]| shape.iter().map(|&d| d as u64).product::<u64>() * esize;
    let total: u64 = tensors.iter().map(|(_, s)| size(s)).sum();
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut cum: u128 = 0;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let sz = u128::from(size(shape));
        let cur = groups.len() - 1;
        let shards_after = shards - cur - 1;
        let left_incl = n - i;
        if !groups[cur].is_empty() && shards_after > 0 {
            // Start a new shard when this tensor's midpoint lies past the current shard's share,
            // or when every remaining tensor is needed to fill the remaining shards.
            let past_share =
                (2 * cum + sz) * shards as u128 > 2 * u128::from(total) * (cur as u128 + 1);
            if past_share || left_incl == shards_after {
                groups.push(Vec::new());
            }
        }
        groups
            .last_mut()
            .expect("non-empty")
            .push((name.clone(), shape.clone()));
        cum += sz;
    }
    debug_assert_eq!(groups.len(), shards);
    let n_files = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, tensors)| ShardPlan {
            file_name: shard_name(i, n_files),
            data_bytes: tensors.iter().map(|(_, s)| size(s)).sum(),
            tensors,
        })
        .collect()
}

/// Default number of generator threads.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS)
}

/// What every tensor of a checkpoint is generated from.
#[derive(Debug, Clone, Copy)]
pub struct WeightGen<'a> {
    /// Storage dtype.
    pub dtype: Dtype,
    /// Random seed.
    pub seed: u64,
    /// The distributions by tensor name.
    pub rules: &'a InitRules,
    /// Embedding/LM-head rows that get values; later rows are zero.
    pub live_rows: usize,
}

/// Writes one shard: header, then every tensor streamed chunk by chunk, chunks generated by
/// `threads` workers (the bytes do not depend on `threads`). `progress` gets the number of data
/// bytes written after each chunk.
pub fn write_shard(
    dir: &Path,
    plan: &ShardPlan,
    gen: WeightGen<'_>,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<WrittenFile, SplitError> {
    let WeightGen {
        dtype,
        seed,
        rules,
        live_rows,
    } = gen;
    let headers = plan
        .tensors
        .iter()
        .map(|(name, shape)| TensorHeader {
            name: name.clone(),
            dtype,
            shape: shape.clone(),
        })
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let path = dir.join(&plan.file_name);
    let mut w = AlignedWriter::create(&path, headers, metadata, WEIGHT_ALIGNMENT)?;
    let jobs = jobs(&plan.tensors, rules, live_rows);
    let threads = threads.clamp(1, MAX_THREADS).min(jobs.len().max(1));
    if threads == 1 {
        let mut buf = Vec::new();
        for job in &jobs {
            job.run(seed, dtype, &mut buf);
            w.write_data(&buf)?;
            progress(buf.len() as u64);
        }
        return w.finish();
    }
    std::thread::scope(|scope| -> Result<(), SplitError> {
        // Worker k makes jobs k, k + threads, ...; it owns two buffers that circulate between
        // it and the writer, which takes chunks from the workers round-robin, i.e. in order.
        let mut filled: Vec<Receiver<Vec<u8>>> = Vec::with_capacity(threads);
        let mut empty: Vec<SyncSender<Vec<u8>>> = Vec::with_capacity(threads);
        for k in 0..threads {
            let (full_tx, full_rx) = sync_channel::<Vec<u8>>(2);
            let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(2);
            for _ in 0..2 {
                empty_tx.send(Vec::new()).expect("receiver alive");
            }
            let jobs = &jobs;
            scope.spawn(move || {
                for job in jobs.iter().skip(k).step_by(threads) {
                    // Either channel failing means the writer stopped (error): just exit.
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    job.run(seed, dtype, &mut buf);
                    if full_tx.send(buf).is_err() {
                        return;
                    }
                }
            });
            filled.push(full_rx);
            empty.push(empty_tx);
        }
        for i in 0..jobs.len() {
            let k = i % threads;
            let buf = filled[k].recv().expect("generator threads do not fail");
            w.write_data(&buf)?;
            progress(buf.len() as u64);
            // The worker may be done already; then the buffer is simply dropped.
            let _ = empty[k].send(buf);
        }
        Ok(())
        // Dropping the channels here unblocks any worker left waiting (after an error).
    })?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_loop_matches_the_reference_generator() {
        let init = Init {
            mean: 0.5,
            std: 0.1,
        };
        for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let mut rng = Xoshiro256pp::for_chunk(3, fnv1a64("abc"), 5);
            let mut reference = rng.clone();
            let mut buf = Vec::new();
            fill_chunk(&mut rng, init, dtype, 1000, &mut buf);
            for i in 0..1000 {
                let want = init.mean + init.std * reference.next_normal();
                let got = match dtype {
                    Dtype::F32 => f32::from_le_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap()),
                    Dtype::BF16 => {
                        let b = u16::from_le_bytes(buf[i * 2..i * 2 + 2].try_into().unwrap());
                        half::bf16::from_bits(b).to_f32()
                    }
                    _ => {
                        let b = u16::from_le_bytes(buf[i * 2..i * 2 + 2].try_into().unwrap());
                        half::f16::from_bits(b).to_f32()
                    }
                };
                let tol = if dtype == Dtype::F32 { 1e-6 } else { 0.004 };
                assert!((want - got).abs() <= tol, "{dtype} #{i}: {want} vs {got}");
            }
            // The state advanced exactly as the reference one did.
            assert_eq!(rng.next_u64(), reference.next_u64());
        }
        // BF16 rounding is the `half` crate's (round to nearest even).
        let mut rng = Xoshiro256pp::for_chunk(9, 1, 0);
        let mut reference = rng.clone();
        let mut buf = Vec::new();
        fill_chunk(
            &mut rng,
            Init {
                mean: 0.0,
                std: 1.0,
            },
            Dtype::BF16,
            4096,
            &mut buf,
        );
        for i in 0..4096 {
            let r = reference.next_u64();
            let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
            let v = sum as f32 * (1.0 / LANES_STD) + (0.0 - LANES_MEAN * (1.0 / LANES_STD));
            let want = half::bf16::from_f32(v).to_bits();
            assert_eq!(
                u16::from_le_bytes([buf[2 * i], buf[2 * i + 1]]),
                want,
                "#{i}"
            );
        }
    }

    #[test]
    fn values_are_normal_ish() {
        let mut rng = Xoshiro256pp::for_chunk(1, 2, 0);
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| rng.next_normal() as f64).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let within1 = v.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        assert!((within1 - 0.683).abs() < 0.02, "{within1}");
        assert!(v.iter().all(|x| x.abs() < 3.47));
    }

    #[test]
    fn output_does_not_depend_on_threads_and_chunks_are_independent() {
        let tensors = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![3 * CHUNK_ELEMS / 64 + 7, 64],
            ),
            ("model.norm.weight".to_string(), vec![64]),
            ("lm_head.weight".to_string(), vec![100, 64]),
        ];
        let plan = &plan_shards(&tensors, 2, 1)[0];
        let dir = tempfile::tempdir().unwrap();
        let mut outputs = Vec::new();
        for threads in [1, 2, 3] {
            let sub = dir.path().join(threads.to_string());
            std::fs::create_dir(&sub).unwrap();
            let mut done = 0;
            let f = write_shard(
                &sub,
                plan,
                WeightGen {
                    dtype: Dtype::BF16,
                    seed: 42,
                    rules: &InitRules::llama(64),
                    live_rows: usize::MAX,
                },
                threads,
                &mut |n| done += n,
            )
            .unwrap();
            assert_eq!(done, plan.data_bytes);
            outputs.push(std::fs::read(f.path).unwrap());
        }
        assert!(outputs.iter().all(|o| *o == outputs[0]));
        // The embedding's bytes are the whole-tensor generator's, at the start of the data.
        let (name, shape) = &tensors[0];
        let emb = tensor_bytes(
            42,
            name,
            shape,
            &InitRules::llama(64),
            usize::MAX,
            Dtype::BF16,
        );
        let data_start = outputs[0].len() - plan.data_bytes as usize;
        assert_eq!(&outputs[0][data_start..data_start + emb.len()], &emb[..]);
    }

    #[test]
    fn shards_are_balanced_ordered_and_non_empty() {
        let t = |n: usize| {
            (0..n)
                .map(|i| (format!("t{i}"), vec![10 + i % 3]))
                .collect::<Vec<_>>()
        };
        for n in [1, 2, 5, 17] {
            for shards in 1..=n {
                let tensors = t(n);
                let plan = plan_shards(&tensors, 2, shards);
                assert_eq!(plan.len(), shards);
                assert!(plan.iter().all(|s| !s.tensors.is_empty()));
                let joined: Vec<_> = plan.iter().flat_map(|s| s.tensors.clone()).collect();
                assert_eq!(joined, tensors);
            }
        }
        // Equal tensors split evenly.
        let tensors = t(12)
            .into_iter()
            .map(|(n, _)| (n, vec![8]))
            .collect::<Vec<_>>();
        let plan = plan_shards(&tensors, 4, 4);
        assert!(plan.iter().all(|s| s.tensors.len() == 3), "{plan:?}");
    }
}
