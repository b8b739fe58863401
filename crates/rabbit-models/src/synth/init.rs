//! What each synthetic tensor is drawn from: its mean and standard deviation, decided by its
//! name and shape (embedding and LM head, final norm, other norms, biases, linear weights), with
//! the scales chosen so a random model's greedy decoding is not degenerate.

use crate::blocks::NormKind;
use crate::spec::ModelSpec;

/// How a tensor's values are distributed: `mean + std * N(0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    /// Mean.
    pub mean: f32,
    /// Standard deviation.
    pub std: f32,
}

/// Std of the embedding (and LM head) rows: `EMBED_SCALE / sqrt(hidden)`. Kept small so that,
/// with tied embeddings, the current token's own embedding (still in the residual stream) does
/// not dominate the next logits and make greedy decoding repeat it.
pub const EMBED_SCALE: f32 = 0.5;
/// Mean of the final RMSNorm weight: the logits of the normalized last hidden state have a std
/// of about `EMBED_SCALE * FINAL_NORM_MEAN` = 2 (real models also have large final norm gains).
pub const FINAL_NORM_MEAN: f32 = 4.0;
/// Std of the noise around 1.0 in RMSNorm weights.
pub const NORM_NOISE: f32 = 0.02;
/// Std of the bias values.
pub const BIAS_STD: f32 = 0.02;

/// What decides a tensor's distribution: the model width and which names are the embedding,
/// LM head and final norm.
#[derive(Debug, Clone)]
pub struct InitRules {
    /// Model width.
    pub hidden: usize,
    embed: String,
    lm_head: String,
    final_norm: String,
    /// Gemma's norms scale by `1 + w`: their stored weights centre on 0, not 1.
    norm_offset: f32,
    /// The model multiplies embeddings by this (Gemma): the embedding is drawn that much
    /// smaller, and the final norm that much larger, so the residual stream and the tied
    /// logits keep the scales of the other families (greedy decoding stays varied).
    embed_scale: f32,
    /// Rows of an untied LM head that get values (the rest, the special tokens', are zero).
    head_rows: Option<usize>,
}

impl InitRules {
    /// Zero the untied LM head's rows from `rows` on: a random model then never picks a special
    /// token (its end-of-turn above all), so demos run to their length instead of stopping at
    /// the first token by chance.
    pub fn with_head_rows(mut self, rows: usize) -> InitRules {
        self.head_rows = Some(rows);
        self
    }

    /// The rules for a model.
    pub fn for_spec(spec: &ModelSpec) -> InitRules {
        let t = &spec.tensors;
        InitRules {
            hidden: spec.hidden_size,
            embed: t.embed_weight(),
            lm_head: t.lm_head_weight(),
            final_norm: t.final_norm_weight(),
            norm_offset: if spec.norm.kind == NormKind::RmsOffset {
                1.0
            } else {
                0.0
            },
            embed_scale: spec.embed_scale.unwrap_or(1.0) as f32,
            head_rows: None,
        }
    }

    /// Llama-lineage names (`model.embed_tokens.weight`, ...) for a width.
    pub fn llama(hidden: usize) -> InitRules {
        InitRules {
            hidden,
            embed: "model.embed_tokens.weight".into(),
            lm_head: "lm_head.weight".into(),
            final_norm: "model.norm.weight".into(),
            norm_offset: 0.0,
            embed_scale: 1.0,
            head_rows: None,
        }
    }

    fn is_head(&self, name: &str) -> bool {
        name == self.embed || name == self.lm_head
    }

    /// Elements of tensor `name` (of `total`) that get values; the rest are zero. The embedding
    /// and LM head have values in their first `live_rows` rows (the tokenizer's), an untied LM
    /// head only in its first `head_rows`.
    pub fn live_elements(&self, name: &str, total: u64, live_rows: usize) -> u64 {
        if !self.is_head(name) {
            return total;
        }
        let rows = match self.head_rows {
            Some(r) if name == self.lm_head => r.min(live_rows),
            _ => live_rows,
        };
        (rows as u64).saturating_mul(self.hidden as u64).min(total)
    }
}

/// The distribution of one tensor, from its name and shape.
pub fn init_for(rules: &InitRules, name: &str, shape: &[usize]) -> Init {
    if rules.is_head(name) {
        return Init {
            mean: 0.0,
            std: EMBED_SCALE / (rules.hidden as f32).sqrt() / rules.embed_scale,
        };
    }
    if name == rules.final_norm {
        let mean = FINAL_NORM_MEAN * rules.embed_scale;
        return Init {
            mean: mean - rules.norm_offset,
            std: NORM_NOISE * mean,
        };
    }
    if name.ends_with("norm.weight") {
        return Init {
            mean: 1.0 - rules.norm_offset,
            std: NORM_NOISE,
        };
    }
    if name.ends_with(".bias") {
        return Init {
            mean: 0.0,
            std: BIAS_STD,
        };
    }
    // Linear weight [out, in]: std 1/sqrt(fan_in) keeps activations at unit scale.
    let fan_in = shape.last().copied().unwrap_or(1).max(1);
    Init {
        mean: 0.0,
        std: 1.0 / (fan_in as f32).sqrt(),
    }
}
