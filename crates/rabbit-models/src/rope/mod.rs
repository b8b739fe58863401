//! Rotary position embedding variants, computed exactly as transformers'
//! `modeling_rope_utils.py` does (inverse frequencies plus a cos/sin scaling factor). Reading
//! them from config.json is in `config.rs`.

use serde::{Deserialize, Serialize};

/// How the inverse frequencies are derived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Interpolation factor.
        factor: f64,
    },
    /// Dynamic NTK: the base grows once positions exceed `max_position_embeddings`.
    Dynamic {
        /// Scaling factor.
        factor: f64,
        /// The length past which the base is rescaled (config's `max_position_embeddings`).
        max_position_embeddings: usize,
    },
    /// YaRN (NTK-by-parts with an attention temperature).
    Yarn {
        /// Scaling factor.
        factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
        /// Multiplier of cos/sin.
        attention_factor: f64,
        /// Extrapolation boundary (rotations).
        beta_fast: f64,
        /// Interpolation boundary (rotations).
        beta_slow: f64,
        /// Whether the correction range is rounded outwards.
        truncate: bool,
    },
    /// Phi-3's LongRoPE: per-frequency factors, `short_factor` while a sequence is no longer
    /// than `original_max_position_embeddings`, `long_factor` past it (decided per sequence on
    /// its largest position, as transformers decides per forward).
    #[serde(rename = "longrope")]
    LongRope {
        /// Divisors of the inverse frequencies for short sequences.
        short_factor: Vec<f64>,
        /// Divisors of the inverse frequencies for long sequences.
        long_factor: Vec<f64>,
        /// Pre-training context length: the switch point.
        original_max_position_embeddings: usize,
        /// Multiplier of cos/sin.
        attention_factor: f64,
    },
    /// QWen v1's dynamic NTK (`use_dynamic_ntk`): each sequence's prompt length `L` decides,
    /// at prefill, `alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1)`, and its base becomes
    /// `theta · alpha^(dim / (dim - 2))` for the whole generation (the original code keeps the
    /// prefill's alpha while decoding, and cached keys keep their rotation).
    #[serde(rename = "qwen_ntk")]
    QwenNtk {
        /// config.json `seq_length`: the training context.
        seq_length: usize,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scaling factor for low frequencies.
        factor: f64,
        /// Wavelength boundary (low).
        low_freq_factor: f64,
        /// Wavelength boundary (high).
        high_freq_factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
    },
}

/// QWen v1's `get_ntk_alpha` for a prompt of `len` tokens and a training context of
/// `seq_length`, in the same f64 operations as the original Python (`math.log(x, 2)` is
/// `ln x / ln 2`, which decides the ceiling at exact powers of two).
pub fn qwen_ntk_alpha(len: usize, seq_length: usize) -> f64 {
    let context = (len as f64 / seq_length as f64).ln() / 2f64.ln() + 1.0;
    (2f64.powf(context.ceil()) - 1.0).max(1.0)
}

/// Everything needed to build cos/sin tables for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeSpec {
    /// RoPE base.
    pub theta: f64,
    /// Rotary width: the head dimension, or its first `partial_rotary_factor` part (the rest of
    /// each head passes through unrotated).
    pub dim: usize,
    /// Scaling variant.
    pub scaling: RopeScaling,
    /// Rotate interleaved pairs `(x0, x1), (x2, x3), ...` (GLM) instead of the two halves.
    #[serde(default)]
    pub interleaved: bool,
    /// Rotate q and k in f32 with f32 tables, then cast back (QWen v1, Baichuan 2 7B), instead
    /// of in the compute dtype with tables cast to it (transformers' Llama). The same in f32.
    #[serde(default)]
    pub rotate_f32: bool,
}

mod config;

impl RopeSpec {
    /// Unscaled rotary over whole heads of `dim` channels (halves layout).
    pub fn plain(theta: f64, dim: usize) -> RopeSpec {
        RopeSpec {
            theta,
            dim,
            scaling: RopeScaling::Default,
            interleaved: false,
            rotate_f32: false,
        }
    }

    /// Inverse frequencies (`dim / 2` values) and the cos/sin multiplier for a forward pass whose
    /// largest position is `seq_len - 1`. Only the dynamic variant depends on `seq_len`.
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let dim = self.dim;
        // transformers computes these in float32; so do we, to agree to the last bit.
        let base_inv = |base: f64| -> Vec<f32> {
            (0..dim)
                .step_by(2)
                .map(|i| {
                    let exponent = i as f32 / dim as f32;
                    1.0f32 / (base as f32).powf(exponent)
                })
                .collect()
        };
        match &self.scaling {
            RopeScaling::Default => (base_inv(self.theta), 1.0),
            RopeScaling::Linear { factor } => (
                base_inv(self.theta)
                    .into_iter()
                    .map(|f| f / *factor as f32)
                    .collect(),
                1.0,
            ),
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let seq = seq_len.max(*max_position_embeddings) as f64;
                let max = *max_position_embeddings as f64;
                let base = self.theta
                    * ((factor * seq / max) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                (base_inv(base), 1.0)
            }
            RopeScaling::QwenNtk { seq_length } => (
                base_inv(
                    self.theta
                        * qwen_ntk_alpha(seq_len, *seq_length)
                            .powf(dim as f64 / (dim as f64 - 2.0)),
                ),
                1.0,
            ),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            } => {
                let base = self.theta;
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rot: f64| {
                    (dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let factor = *factor as f32;
                let inv = (0..dim)
                    .step_by(2)
                    .enumerate()
                    .map(|(j, i)| {
                        let pos_freq = (base as f32).powf(i as f32 / dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor * pos_freq);
                        // As torch: `arange - low` in f32, the width `high - low` in f64
                        // then f32.
                        let ramp = ((j as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        interpolation * (1.0 - extra_factor) + extrapolation * extra_factor
                    })
                    .collect();
                (inv, *attention_factor as f32)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let ext = if seq_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let inv = (0..dim)
                    .step_by(2)
                    .zip(ext)
                    .map(|(i, e)| {
                        1.0f32 / (*e as f32 * (self.theta as f32).powf(i as f32 / dim as f32))
                    })
                    .collect();
                (inv, *attention_factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let (factor, low_ff, high_ff) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let low_wavelen = old / low_ff;
                let high_wavelen = old / high_ff;
                let inv = base_inv(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // Written as transformers does (NaN-free inputs, so this is `high <= w <= low`).
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low_ff) / (high_ff - low_ff);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_matches_closed_form() {
        let r = RopeSpec::from_config(10000.0, 8, None, None, None, 128).unwrap();
        let (inv, scale) = r.inv_freq(1);
        assert_eq!(scale, 1.0);
        let want = [1.0, 0.1, 0.01, 0.001];
        for (a, b) in inv.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn classic_type_key_and_theta_override() {
        let v = json!({"type": "linear", "factor": 2.0, "rope_theta": 100.0});
        let r = RopeSpec::from_config(10000.0, 4, None, None, Some(&v), 128).unwrap();
        assert_eq!(r.theta, 100.0);
        let (inv, _) = r.inv_freq(1);
        assert!((inv[1] - 0.1 / 2.0).abs() < 1e-6);
    }

    #[test]
    fn llama3_leaves_high_frequencies_and_scales_low_ones() {
        let v = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let r = RopeSpec::from_config(10000.0, 16, None, None, Some(&v), 512).unwrap();
        let (plain, _) = RopeSpec::from_config(10000.0, 16, None, None, None, 512)
            .unwrap()
            .inv_freq(1);
        let (inv, _) = r.inv_freq(1);
        assert_eq!(inv[0], plain[0], "highest frequency untouched");
        assert!(
            (inv[7] - plain[7] / 8.0).abs() < 1e-9,
            "lowest frequency divided by factor"
        );
    }

    #[test]
    fn dynamic_only_changes_past_the_configured_length() {
        let v = json!({"rope_type": "dynamic", "factor": 2.0});
        let r = RopeSpec::from_config(10000.0, 8, None, None, Some(&v), 100).unwrap();
        let (plain, _) = RopeSpec::from_config(10000.0, 8, None, None, None, 100)
            .unwrap()
            .inv_freq(1);
        assert_eq!(r.inv_freq(50).0, plain);
        assert!(r.inv_freq(300).0[1] < plain[1]);
    }

    #[test]
    fn yarn_attention_factor_default() {
        let v = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32});
        let r = RopeSpec::from_config(10000.0, 8, None, None, Some(&v), 128).unwrap();
        let (_, a) = r.inv_freq(1);
        assert!((a as f64 - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn longrope_switches_factors_past_the_original_length() {
        let v = json!({"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [3.0, 4.0],
                       "original_max_position_embeddings": 16});
        let r = RopeSpec::from_config(10000.0, 4, None, None, Some(&v), 64).unwrap();
        let (short, a) = r.inv_freq(16);
        let (long, _) = r.inv_freq(17);
        assert_eq!(short, vec![1.0, 0.01 / 2.0]);
        assert!((long[0] - 1.0 / 3.0).abs() < 1e-7 && (long[1] - 0.01 / 4.0).abs() < 1e-9);
        assert!((a as f64 - (1.0 + 4f64.ln() / 16f64.ln()).sqrt()).abs() < 1e-6);
        let bad =
            json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [3.0, 4.0]});
        let e = RopeSpec::from_config(10000.0, 4, None, None, Some(&bad), 64).unwrap_err();
        assert!(e.contains("short_factor"), "{e}");
    }

    #[test]
    fn partial_rotary_width_and_refusal() {
        let r = RopeSpec::from_config(10000.0, 16, Some(0.4), Some(1.0), None, 64).unwrap();
        assert_eq!(r.dim, 6);
        let e = RopeSpec::from_config(10000.0, 16, Some(0.5), None, None, 64).unwrap_err();
        assert!(e.contains("partial_rotary_factor"), "{e}");
        let e = RopeSpec::from_config(10000.0, 10, Some(0.3), Some(1.0), None, 64).unwrap_err();
        assert!(e.contains("rotary width of 3"), "{e}");
        let v = json!({"partial_rotary_factor": 0.5});
        let e =
            RopeSpec::from_config(10000.0, 16, Some(0.25), Some(1.0), Some(&v), 64).unwrap_err();
        assert!(e.contains("contradicts"), "{e}");
    }

    /// transformers 5.23's `_compute_yarn_parameters` for this config (truncate false, so the
    /// ramp runs between non-integer bounds): the values it printed.
    #[test]
    fn yarn_without_truncation_matches_transformers() {
        let v = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                       "truncate": false});
        let r = RopeSpec::from_config(10000.0, 16, None, None, Some(&v), 8192).unwrap();
        let (inv, a) = r.inv_freq(1);
        let want = [
            1.0,
            0.3162277638912201,
            0.10000000149011612,
            0.02387019619345665,
            0.005056971684098244,
            0.0008112904615700245,
            0.0002500000118743628,
            7.905694656074047e-05,
        ];
        for (g, w) in inv.iter().zip(want) {
            assert_eq!(*g as f64, w as f32 as f64, "{inv:?}");
        }
        assert!((a as f64 - 1.138629436111989).abs() < 1e-6);
    }

    #[test]
    fn unknown_type_is_refused() {
        let v = json!({"rope_type": "su", "factor": 4.0});
        let e = RopeSpec::from_config(10000.0, 8, None, None, Some(&v), 128).unwrap_err();
        assert!(e.contains("`su`"), "{e}");
    }
}
