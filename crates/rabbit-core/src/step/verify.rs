//! Accepting drafts: greedy (a draft survives while it is the target's argmax) and speculative
//! sampling (Leviathan et al. / Chen et al.: accept `x ~ q` with probability
//! `min(1, p(x)/q(x))`, else resample from `max(0, p − q)`), which leaves every emitted token
//! distributed exactly as the target alone would sample it.

use crate::sampling::{distribution, greedy, DegenerateScores, Sampler, SamplingParams};

/// What a verify sweep decided for one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Drafts accepted (a prefix of them).
    pub accepted: usize,
    /// The token after them: the target's correction, or a bonus token when all were accepted.
    pub next: u32,
}

/// The failing position and its scores problem.
pub type VerifyError = (usize, DegenerateScores);

/// Verifies `drafts` (k tokens) against `rows` (k + 1 raw logit rows: row `j` scores the token
/// after `history + drafts[..j]`). `q[j]` is the draft's distribution for `drafts[j]` when it
/// was sampled from one; `None` for a deterministic draft (prompt lookup, greedy drafts).
pub fn verify(
    rows: &[&[f32]],
    drafts: &[u32],
    q: Option<&[Vec<f64>]>,
    history: &[u32],
    params: &SamplingParams,
    sampler: &mut Sampler,
) -> Result<Verdict, VerifyError> {
    debug_assert_eq!(rows.len(), drafts.len() + 1);
    let mut hist = history.to_vec();
    for (j, row) in rows.iter().enumerate() {
        let mut scores = row.to_vec();
        let draft = drafts.get(j).copied();
        if !params.is_sampling() {
            let t = greedy(&mut scores, &hist, params).map_err(|e| (j, e))?;
            match draft {
                Some(d) if d == t => {
                    hist.push(d);
                    continue;
                }
                _ => {
                    return Ok(Verdict {
                        accepted: j,
                        next: t,
                    })
                }
            }
        }
        let p = distribution(&mut scores, &hist, params).map_err(|e| (j, e))?;
        let Some(d) = draft else {
            return Ok(Verdict {
                accepted: j,
                next: sampler.sample(&p),
            });
        };
        let qd = q.map_or(1.0, |q| q[j][d as usize]);
        let pd = p[d as usize];
        // u < p/q, written without dividing (q(d) > 0: d was drawn from q).
        if sampler.uniform() * qd < pd {
            hist.push(d);
            continue;
        }
        let residual: Vec<f64> = match q {
            Some(q) => p.iter().zip(&q[j]).map(|(a, b)| (a - b).max(0.0)).collect(),
            None => {
                let mut r = p.clone();
                r[d as usize] = 0.0;
                r
            }
        };
        // All mass removed only when p <= q everywhere, i.e. p == q up to rounding: then the
        // rejection itself had probability ~0 and p is the right law.
        let next = if residual.iter().sum::<f64>() > 0.0 {
            sampler.sample(&residual)
        } else {
            sampler.sample(&p)
        };
        return Ok(Verdict { accepted: j, next });
    }
    unreachable!("the last row has no draft and always returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(p: &[f64]) -> Vec<f32> {
        p.iter().map(|x| x.ln() as f32).collect()
    }

    /// Pearson's chi-square of `counts` against probabilities `p` (cells with p > 0).
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn greedy_accepts_the_argmax_prefix() {
        let params = SamplingParams::default();
        let mut s = Sampler::new(0);
        let r0 = [0.0f32, 5.0, 1.0];
        let r1 = [3.0f32, 0.0, 1.0];
        let r2 = [0.0f32, 0.0, 9.0];
        let rows: [&[f32]; 3] = [&r0, &r1, &r2];
        let v = verify(&rows, &[1, 0], None, &[], &params, &mut s).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 2,
                next: 2
            }
        );
        let v = verify(&rows, &[1, 2], None, &[], &params, &mut s).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 1,
                next: 0
            }
        );
        let v = verify(&rows, &[0, 0], None, &[], &params, &mut s).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next: 1
            }
        );
    }

    /// The first emitted token of a verify follows the target's law whatever the draft's, for a
    /// sampled draft (q) and a deterministic one. 99.9% quantile of chi-square with 5 degrees
    /// of freedom: 20.5.
    #[test]
    fn speculative_sampling_preserves_the_target_distribution() {
        let p = [0.05, 0.30, 0.10, 0.25, 0.20, 0.10];
        let q = [0.40, 0.05, 0.05, 0.20, 0.10, 0.20];
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let target = logits(&p);
        let bonus = logits(&[1.0 / 6.0; 6]);
        let rows: [&[f32]; 2] = [&target, &bonus];
        let trials = 30_000;
        for sampled_draft in [true, false] {
            let mut counts = [0u64; 6];
            let mut s = Sampler::new(42);
            for i in 0..trials {
                let d = if sampled_draft {
                    s.sample(&q)
                } else {
                    // A deterministic draft that cycles through the vocabulary.
                    (i % 6) as u32
                };
                let qs = vec![q.to_vec()];
                let v = verify(
                    &rows,
                    &[d],
                    sampled_draft.then_some(qs.as_slice()),
                    &[],
                    &params,
                    &mut s,
                )
                .unwrap();
                let first = if v.accepted == 1 { d } else { v.next };
                counts[first as usize] += 1;
            }
            let x2 = chi_square(&counts, &p);
            assert!(
                x2 < 20.5,
                "sampled draft {sampled_draft}: chi2 {x2} {counts:?}"
            );
        }
    }

    /// The check has power: the draft's own law is rejected.
    #[test]
    fn the_chi_square_bound_rejects_a_wrong_law() {
        let p = [0.05, 0.30, 0.10, 0.25, 0.20, 0.10];
        let q = [0.40, 0.05, 0.05, 0.20, 0.10, 0.20];
        let mut s = Sampler::new(1);
        let mut counts = [0u64; 6];
        for _ in 0..30_000 {
            counts[s.sample(&q) as usize] += 1;
        }
        assert!(chi_square(&counts, &p) > 20.5);
    }
}
