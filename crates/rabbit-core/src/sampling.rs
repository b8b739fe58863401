//! Logits processing and token choice, matching transformers' processors: repetition penalty,
//! then (when sampling) temperature, top-k and top-p, applied in that order.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::error::{CoreError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise logits are divided by it and a token is sampled.
    pub temperature: f64,
    /// Keep only the k most likely tokens (sampling only).
    pub top_k: Option<usize>,
    /// Keep the smallest set whose probability reaches p (sampling only).
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already in the sequence (greedy and sampling).
    pub repetition_penalty: Option<f64>,
    /// Seed of each sequence's random stream (the same for every row, so a sequence samples the
    /// same tokens alone or in a batch).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects meaningless settings with a message naming the option.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(CoreError::InvalidInput(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        // Scores are divided in f32: a temperature that is not a normal f32 (below ~1.2e-38, or
        // beyond f32's range) makes every score inf or 0 and the distribution NaN.
        if self.temperature > 0.0 && !is_normal_f32(self.temperature) {
            return Err(CoreError::InvalidInput(format!(
                "temperature {} is outside what float32 scores can be divided by \
                 ({:e}..{:e}); use 0 for greedy decoding",
                short(self.temperature),
                f32::MIN_POSITIVE,
                f32::MAX
            )));
        }
        if self.top_k == Some(0) {
            return Err(CoreError::InvalidInput("top-k must be >= 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(CoreError::InvalidInput(format!(
                    "top-p must be in (0, 1], got {p}"
                )));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return Err(CoreError::InvalidInput(format!(
                    "repetition penalty must be > 0, got {r}"
                )));
            }
            if !is_normal_f32(r) {
                return Err(CoreError::InvalidInput(format!(
                    "repetition penalty {} is outside what float32 scores can be scaled by \
                     ({:e}..{:e})",
                    short(r),
                    f32::MIN_POSITIVE,
                    f32::MAX
                )));
            }
        }
        Ok(())
    }

    /// Whether tokens are sampled (otherwise argmax).
    pub fn is_sampling(&self) -> bool {
        self.temperature > 0.0
    }
}

/// `0.7`, but `1e-37` rather than 37 zeros.
fn short(v: f64) -> String {
    if v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// Whether `v` survives the cast to f32 as a normal, finite number.
fn is_normal_f32(v: f64) -> bool {
    (v as f32).is_normal()
}

/// Scores no token can be chosen from: NaN, or (when sampling) +inf or nothing left. Finite
/// logits get there only through settings that overflow f32 (a tiny temperature or penalty
/// against large logits); transformers' `torch.multinomial` refuses the same distributions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the scores after the logits processors are degenerate (token {token}: {value}) with \
     temperature {} and repetition penalty {}: the settings overflow float32 for these logits; \
     use a larger temperature, or 0 for greedy decoding",
    short(*.temperature),
    short(*.penalty)
)]
pub struct DegenerateScores {
    /// The first offending token (for `-inf`: every token was filtered).
    pub token: usize,
    /// Its score.
    pub value: f32,
    /// The temperature in use.
    pub temperature: f64,
    /// The repetition penalty in use (1 = none).
    pub penalty: f64,
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every id in `history` has its score
/// divided by the penalty if positive, multiplied if negative.
pub fn apply_repetition_penalty(scores: &mut [f32], history: &[u32], penalty: f32) {
    // transformers gathers then scatters: a repeated id is penalised once, not once per
    // occurrence.
    let mut seen = vec![false; scores.len()];
    for &id in history {
        let id = id as usize;
        if id < scores.len() && !seen[id] {
            seen[id] = true;
            let s = &mut scores[id];
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

/// transformers' `TemperatureLogitsWarper`.
pub fn apply_temperature(scores: &mut [f32], temperature: f32) {
    for s in scores.iter_mut() {
        *s /= temperature;
    }
}

/// transformers' `TopKLogitsWarper`: everything below the k-th largest score becomes -inf
/// (ties with the k-th survive).
pub fn apply_top_k(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len());
    if k == 0 || k == scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// transformers' `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative
/// probability stays <= 1 - p, always keeping the most likely one.
pub fn apply_top_p(scores: &mut [f32], p: f64) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = order
        .iter()
        .map(|&i| ((scores[i] - max) as f64).exp())
        .collect();
    let total: f64 = exps.iter().sum();
    let threshold = 1.0 - p;
    let mut cum = 0.0f64;
    let last = order.len().saturating_sub(1);
    for (rank, &i) in order.iter().enumerate() {
        cum += exps[rank] / total;
        if cum <= threshold && rank != last {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Applies the processors in transformers' order. Temperature/top-k/top-p only when sampling
/// (transformers ignores them for greedy search).
pub fn process(scores: &mut [f32], history: &[u32], params: &SamplingParams) {
    if let Some(r) = params.repetition_penalty {
        if r != 1.0 {
            apply_repetition_penalty(scores, history, r as f32);
        }
    }
    if params.is_sampling() {
        if params.temperature != 1.0 {
            apply_temperature(scores, params.temperature as f32);
        }
        if let Some(k) = params.top_k {
            apply_top_k(scores, k);
        }
        if let Some(p) = params.top_p {
            if p < 1.0 {
                apply_top_p(scores, p);
            }
        }
    }
}

/// Index of the largest score (the first one on ties, as torch.argmax).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// A per-sequence token chooser with its own seeded random stream.
pub struct Sampler {
    rng: ChaCha20Rng,
}

impl Sampler {
    /// A sampler seeded with `seed`.
    pub fn new(seed: u64) -> Sampler {
        Sampler {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// Processes `scores` (finite logits) in place and picks the next token; refuses scores the
    /// settings made degenerate rather than picking an arbitrary token.
    pub fn choose(
        &mut self,
        scores: &mut [f32],
        history: &[u32],
        params: &SamplingParams,
    ) -> std::result::Result<u32, DegenerateScores> {
        if !params.is_sampling() {
            return greedy(scores, history, params);
        }
        let p = distribution(scores, history, params)?;
        Ok(self.sample(&p))
    }

    /// A uniform draw in `[0, 1)` from the sequence's stream.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Draws an index with probability proportional to `weights` (non-negative, not all zero).
    pub fn sample(&mut self, weights: &[f64]) -> u32 {
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.random::<f64>() * total;
        let mut last_nonzero = 0;
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                last_nonzero = i;
                if x < *w {
                    return i as u32;
                }
                x -= w;
            }
        }
        last_nonzero as u32
    }
}

fn degenerate(params: &SamplingParams, token: usize, value: f32) -> DegenerateScores {
    DegenerateScores {
        token,
        value,
        temperature: params.temperature,
        penalty: params.repetition_penalty.unwrap_or(1.0),
    }
}

/// Greedy choice: processes `scores` in place (repetition penalty) and takes the argmax; +inf
/// is a clear argmax (transformers picks it too), NaN is refused.
pub fn greedy(
    scores: &mut [f32],
    history: &[u32],
    params: &SamplingParams,
) -> std::result::Result<u32, DegenerateScores> {
    process(scores, history, params);
    if let Some((j, &v)) = scores.iter().enumerate().find(|(_, v)| v.is_nan()) {
        return Err(degenerate(params, j, v));
    }
    Ok(argmax(scores))
}

/// The sampling distribution (probabilities summing to 1) after the processors; `scores` are
/// processed in place. Refuses NaN, +inf, or nothing left to sample.
pub fn distribution(
    scores: &mut [f32],
    history: &[u32],
    params: &SamplingParams,
) -> std::result::Result<Vec<f64>, DegenerateScores> {
    process(scores, history, params);
    // exp(s - max) needs a finite max.
    if let Some((j, &v)) = scores
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
    {
        return Err(degenerate(params, j, v));
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(degenerate(params, 0, max));
    }
    let mut weights: Vec<f64> = scores.iter().map(|s| ((s - max) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    for w in &mut weights {
        *w /= total;
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut s = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        // id 1 appears twice: transformers gathers/scatters once per occurrence of the same
        // original value, so the penalty applies once.
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let mut s = vec![1.0, 3.0, 3.0, 0.5];
        apply_top_k(&mut s, 1);
        assert_eq!(s[1], 3.0);
        assert_eq!(s[2], 3.0);
        assert_eq!(s[0], f32::NEG_INFINITY);
    }

    #[test]
    fn top_p_keeps_at_least_one() {
        let mut s = vec![10.0, 0.0, 0.0];
        apply_top_p(&mut s, 0.01);
        assert_eq!(s[0], 10.0);
        assert!(s[1].is_infinite() && s[2].is_infinite());
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let scores = vec![0.1f32; 50];
        let a: Vec<u32> = {
            let mut s = Sampler::new(7);
            (0..20)
                .map(|_| s.choose(&mut scores.clone(), &[], &params).unwrap())
                .collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(7);
            (0..20)
                .map(|_| s.choose(&mut scores.clone(), &[], &params).unwrap())
                .collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "uniform scores should not always give one token"
        );
    }

    /// Settings that make f32 scores inf/0 are refused by name before any compute.
    #[test]
    fn settings_outside_float32_are_refused_by_name() {
        let bad = [
            (1e-38, None, "temperature"),
            (1e-45, None, "temperature"),
            (1e39, None, "temperature"),
            (-1.0, None, "temperature"),
            (f64::NAN, None, "temperature"),
            (1.0, Some(1e-39), "repetition penalty"),
            (1.0, Some(1e39), "repetition penalty"),
            (1.0, Some(0.0), "repetition penalty"),
        ];
        for (temperature, repetition_penalty, name) in bad {
            let p = SamplingParams {
                temperature,
                repetition_penalty,
                ..Default::default()
            };
            let e = p.validate().unwrap_err().to_string();
            assert!(
                e.contains(name),
                "{temperature} {repetition_penalty:?}: {e}"
            );
        }
        for top_p in [0.0, 1.5, f64::NAN] {
            let p = SamplingParams {
                temperature: 1.0,
                top_p: Some(top_p),
                ..Default::default()
            };
            assert!(p.validate().unwrap_err().to_string().contains("top-p"));
        }
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(0),
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top-k"));
    }

    /// A tiny but valid temperature: small logits give the greedy limit (as transformers does:
    /// the scores stay finite), large ones overflow and are refused instead of giving token 0.
    #[test]
    fn overflowing_scores_are_an_error_not_token_zero() {
        let params = SamplingParams {
            temperature: 1e-37,
            ..Default::default()
        };
        params.validate().unwrap();
        let mut s = Sampler::new(0);
        let small = vec![0.5f32, 2.0, -1.0];
        assert_eq!(s.choose(&mut small.clone(), &[], &params), Ok(1));
        let large = vec![0.5f32, 40.0, -1.0];
        let e = s.choose(&mut large.clone(), &[], &params).unwrap_err();
        assert_eq!((e.token, e.value), (1, f32::INFINITY));
        assert!(e.to_string().contains("temperature 1e-37"), "{e}");
        // Greedy takes a +inf score as the argmax (a tiny penalty on a negative logit gives
        // -inf, on a positive one +inf), like torch.argmax.
        let greedy = SamplingParams {
            repetition_penalty: Some(1e-37),
            ..Default::default()
        };
        assert_eq!(s.choose(&mut [50.0, 60.0], &[0], &greedy), Ok(0));
        assert!(s.choose(&mut [f32::NAN, 1.0], &[], &greedy).is_err());
    }
}
