//! Reading a [`RopeSpec`] from config.json's rope settings (either layout), every value checked.

use serde_json::Value;

use super::{RopeScaling, RopeSpec};

impl RopeSpec {
    /// Parses the rope settings from either config layout. `rope_params` is the
    /// `rope_parameters` dict (transformers 5) or the `rope_scaling` dict (classic), whose
    /// `rope_theta` and `partial_rotary_factor` (if any) override `theta` and `partial`.
    /// `partial` is config.json's top-level `partial_rotary_factor`; `family_partial` the
    /// family's default for it (`None`: the family rotates whole heads and refuses a factor).
    pub fn from_config(
        theta: f64,
        head_dim: usize,
        partial: Option<f64>,
        family_partial: Option<f64>,
        rope_params: Option<&Value>,
        max_position_embeddings: usize,
    ) -> Result<RopeSpec, String> {
        let params = rope_params.filter(|v| !v.is_null());
        let inner = match params.and_then(|p| p.get("partial_rotary_factor")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| format!("rope `partial_rotary_factor` is not a number: {v}"))?,
            ),
        };
        let partial = match (inner, partial) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "`partial_rotary_factor` ({b}) contradicts the rope settings' ({a})"
                ))
            }
            (a, b) => a.or(b).or(family_partial).unwrap_or(1.0),
        };
        let allow_partial = family_partial.is_some();
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(format!(
                "`partial_rotary_factor` must be in (0, 1], got {partial}"
            ));
        }
        if partial != 1.0 && !allow_partial {
            return Err(format!(
                "partial_rotary_factor {partial} is not supported for this architecture"
            ));
        }
        // transformers: int(head_dim * partial_rotary_factor).
        let dim = (head_dim as f64 * partial) as usize;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!(
                "`partial_rotary_factor` {partial} gives a rotary width of {dim} for head_dim {head_dim} (it must be even and positive)"
            ));
        }
        let Some(params) = params else {
            return RopeSpec {
                theta,
                dim,
                scaling: RopeScaling::Default,
                interleaved: false,
                rotate_f32: false,
            }
            .checked(max_position_embeddings);
        };
        let obj = params
            .as_object()
            .ok_or_else(|| format!("rope settings must be an object, got {params}"))?;
        let theta = match obj.get("rope_theta") {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("rope_theta is not a number: {v}"))?,
            None => theta,
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<Option<f64>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("rope `{key}` is not a number: {v}")),
            }
        };
        let need = |key: &str| -> Result<f64, String> {
            num(key)?.ok_or_else(|| format!("rope type `{kind}` needs `{key}`"))
        };
        // Factors of 0 or below divide by zero or flip the frequencies' sign: NaN/inf logits.
        let positive = |key: &str, value: f64| -> Result<f64, String> {
            if value > 0.0 && value.is_finite() {
                Ok(value)
            } else {
                Err(format!(
                    "rope `{key}` must be a positive number, got {value}"
                ))
            }
        };
        let factor = || positive("factor", need("factor")?);
        let original = |default: usize| -> Result<usize, String> {
            match num("original_max_position_embeddings")? {
                None => Ok(default),
                Some(v) if v >= 1.0 && v.fract() == 0.0 && v <= u32::MAX as f64 => Ok(v as usize),
                Some(v) => Err(format!(
                    "rope `original_max_position_embeddings` must be a positive integer, got {v}"
                )),
            }
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor()?,
                max_position_embeddings,
            },
            "yarn" => {
                let original = original(max_position_embeddings)?;
                let factor = match num("factor")? {
                    Some(f) => positive("factor", f)?,
                    None => max_position_embeddings as f64 / original as f64,
                };
                let mscale = num("mscale")?;
                let mscale_all_dim = num("mscale_all_dim")?;
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match num("attention_factor")? {
                    Some(a) => positive("attention_factor", a)?,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, a)
                        }
                        _ => get_mscale(factor, 1.0),
                    },
                };
                // transformers uses `or`: a 0 or missing beta falls back to the default.
                let beta_fast = num("beta_fast")?.filter(|v| *v != 0.0).unwrap_or(32.0);
                let beta_slow = num("beta_slow")?.filter(|v| *v != 0.0).unwrap_or(1.0);
                let truncate = obj.get("truncate").and_then(Value::as_bool).unwrap_or(true);
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor,
                    beta_fast,
                    beta_slow,
                    truncate,
                }
            }
            "llama3" => {
                let low = positive("low_freq_factor", need("low_freq_factor")?)?;
                let high = positive("high_freq_factor", need("high_freq_factor")?)?;
                if high == low {
                    // The smoothing divides by high - low (transformers only warns when
                    // high < low: the smoothing band is then empty, which stays finite).
                    return Err(format!(
                        "rope `high_freq_factor` ({high}) must differ from `low_freq_factor` ({low})"
                    ));
                }
                RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original(max_position_embeddings)?,
                }
            }
            "longrope" => {
                let original = original(max_position_embeddings)?;
                let list = |key: &str| -> Result<Vec<f64>, String> {
                    let v = obj
                        .get(key)
                        .and_then(Value::as_array)
                        .ok_or_else(|| format!("rope type `longrope` needs a list `{key}`"))?;
                    let out: Vec<f64> = v
                        .iter()
                        .map(|x| x.as_f64().filter(|f| *f > 0.0 && f.is_finite()))
                        .collect::<Option<_>>()
                        .ok_or_else(|| format!("rope `{key}` must hold positive numbers"))?;
                    if out.len() != dim / 2 {
                        return Err(format!(
                            "rope `{key}` has {} entries but the rotary width {dim} needs {}",
                            out.len(),
                            dim / 2
                        ));
                    }
                    Ok(out)
                };
                let factor = match num("factor")? {
                    Some(f) => positive("factor", f)?,
                    None => max_position_embeddings as f64 / original as f64,
                };
                let attention_factor = match num("attention_factor")? {
                    Some(a) => positive("attention_factor", a)?,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: list("short_factor")?,
                    long_factor: list("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            other => {
                return Err(format!(
                    "rope type `{other}` is not supported (supported: default, linear, dynamic, yarn, llama3, longrope)"
                ))
            }
        };
        RopeSpec {
            theta,
            dim,
            scaling,
            interleaved: false,
            rotate_f32: false,
        }
        .checked(max_position_embeddings)
    }

    /// Refuses a base that is not a positive number, and any combination whose tables are not
    /// finite up to the longest context (they would turn every logit into NaN).
    fn checked(self, max_position_embeddings: usize) -> Result<RopeSpec, String> {
        let theta = self.theta;
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(format!(
                "`rope_theta` must be a positive number, got {theta}"
            ));
        }
        let (inv, scale) = self.inv_freq(max_position_embeddings.max(1));
        if let Some(f) = inv.iter().find(|f| !(f.is_finite() && **f >= 0.0)) {
            return Err(format!(
                "rope settings (rope_theta {theta}, {:?}) give the inverse frequency {f}",
                self.scaling
            ));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(format!(
                "rope settings ({:?}) give the attention scaling {scale}",
                self.scaling
            ));
        }
        Ok(self)
    }
}
