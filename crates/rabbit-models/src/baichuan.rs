//! Baichuan 2 (`BaichuanForCausalLM`, from the original remote code): the Llama layer with a
//! fused `W_pack` projection and the normalised LM head (NormHead: each vocabulary row divided
//! by its L2 norm). The 7B checkpoints use rotary embeddings, the 13B ones ALiBi; the two ship
//! different modeling files, and the config says which: the 7B config has
//! `max_position_embeddings` (and `hidden_size` 4096), the 13B one only `model_max_length`.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::arch::{Architecture, SlidingPolicy, SynthShape, Variant};
use crate::blocks::{Activation, Param, Role, TensorLayout};
use crate::config::{GenerationConfig, HfConfig};
use crate::error::Result;
use crate::resolve::Resolver;
use crate::spec::ModelSpec;

static BAICHUAN_VARIANT: Variant = Variant {
    name: "BaichuanForCausalLM",
    model_type: "baichuan",
    default_head_dim: None,
    default_rope_theta: 10000.0,
    default_rms_norm_eps: 1e-6,
    sliding: SlidingPolicy::Unsupported,
    default_max_window_layers: 0,
    partial_rotary: None,
    tied_by_default: false,
    activation: ("hidden_act", Activation::Silu),
    harmless_keys: &[
        "_from_model_config",
        "gradient_checkpointing",
        "z_loss_weight",
    ],
};

/// The vocabulary of Baichuan 1 (Baichuan-13B), whose head is a plain linear layer.
const BAICHUAN1_VOCAB: usize = 64000;

/// `BaichuanForCausalLM`.
pub struct Baichuan;

impl Architecture for Baichuan {
    fn variant(&self) -> &'static Variant {
        &BAICHUAN_VARIANT
    }

    fn key(&self) -> &'static str {
        "baichuan"
    }

    fn spec(&self, cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
        spec_with(cfg, gen, None)
    }

    fn spec_in_dir(
        &self,
        cfg: &HfConfig,
        gen: Option<&GenerationConfig>,
        dir: &Path,
    ) -> Result<ModelSpec> {
        spec_with(cfg, gen, scheme_of_code(&dir.join("modeling_baichuan.py")))
    }

    fn synth_config(&self, _: &SynthShape) -> Option<Map<String, Value>> {
        match json!({
            "auto_map": {
                "AutoConfig": "configuration_baichuan.BaichuanConfig",
                "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"
            },
            "tokenizer_class": "BaichuanTokenizer",
        }) {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    fn synth_finish(&self, cfg: &mut Map<String, Value>) {
        // Every Baichuan config says `model_max_length`; the 7B one also the usual key.
        if let Some(n) = cfg.get("max_position_embeddings").cloned() {
            cfg.insert("model_max_length".into(), n);
        }
        for k in ["rope_theta", "rope_scaling", "num_key_value_heads"] {
            cfg.remove(k);
        }
    }
}

/// Rotary (`true`) or ALiBi, as the checkpoint's own `modeling_baichuan.py` says when it ships
/// one (the 7B file has `RotaryEmbedding`, the 13B's `_get_interleave`); `None` when absent or
/// unclear.
fn scheme_of_code(path: &Path) -> Option<bool> {
    let code = std::fs::read_to_string(path).ok()?;
    let (rope, alibi) = (
        code.contains("class RotaryEmbedding"),
        code.contains("def _get_interleave"),
    );
    (rope != alibi).then_some(rope)
}

fn spec_with(
    cfg: &HfConfig,
    gen: Option<&GenerationConfig>,
    code_says_rope: Option<bool>,
) -> Result<ModelSpec> {
    if cfg.rope_theta.is_some() || cfg.rope_scaling.is_some() || cfg.rope_parameters.is_some() {
        return Err(crate::arch::unsupported(
            &BAICHUAN_VARIANT,
            "Baichuan's code reads no `rope_theta`/`rope_scaling` (base 10000, no scaling); this config sets them",
        ));
    }
    let mut r = Resolver::new(&BAICHUAN_VARIANT, cfg, gen);
    let model_max_length: Option<usize> = r.take("model_max_length")?;

    // The checkpoint's own modeling file, when it ships one, says it outright. Else: the 7B
    // config is the only one with `max_position_embeddings` (its config class has the key, the
    // 13B's has not), which checkpoints of any size keep. (vLLM and llama.cpp go by size,
    // hidden 4096 / 32 layers: the same on the released models, but wrong for a 13B-code model
    // of another size.)
    let rope = code_says_rope.unwrap_or(cfg.max_position_embeddings.is_some());
    // BaichuanConfig's default; the 13B code grows its ALiBi table past it anyway.
    let model_max_length = model_max_length.unwrap_or(4096);
    if model_max_length == 0 {
        return Err(crate::arch::unsupported(
            &BAICHUAN_VARIANT,
            "`model_max_length` must be positive",
        ));
    }
    r.set_max_positions(model_max_length);
    let mut spec = r.base()?;
    // Both codes grow their tables (rotary cache, ALiBi mask) past the configured length.
    spec.unbounded_positions = true;
    let (h, q, m) = (spec.hidden_size, spec.q_dim(), spec.intermediate_size);
    // The 7B code rotates `q.float()` with f32 tables, then casts back.
    spec.rope.rotate_f32 = rope;
    if !rope {
        spec.attention.alibi = true;
        spec.notes.push(match code_says_rope {
            Some(_) => "Baichuan 13B code (its modeling_baichuan.py): ALiBi positions".into(),
            None => "Baichuan 13B layout (no `max_position_embeddings`): ALiBi positions".into(),
        });
    }
    if spec.num_kv_heads != spec.num_heads {
        return Err(crate::arch::unsupported(
            &BAICHUAN_VARIANT,
            "`num_key_value_heads` differs from `num_attention_heads`: Baichuan has no grouped keys",
        ));
    }
    spec.lm_head_norm = spec.vocab_size != BAICHUAN1_VOCAB;
    if spec.lm_head_norm && spec.tie_word_embeddings {
        return Err(crate::arch::unsupported(
            &BAICHUAN_VARIANT,
            "`tie_word_embeddings` true with Baichuan 2's normalised head is not supported",
        ));
    }
    if !spec.lm_head_norm {
        spec.notes.push(format!(
            "vocabulary of {BAICHUAN1_VOCAB}: a Baichuan 1 checkpoint, plain LM head (no NormHead)"
        ));
    }
    spec.tensors = TensorLayout::llama_names(vec![
        Param::norm(Role::AttnNorm, "input_layernorm", h, false),
        Param::linear(Role::Qkv, "self_attn.W_pack", 3 * q, h, false),
        Param::linear(Role::O, "self_attn.o_proj", h, q, false),
        Param::norm(Role::MlpNorm, "post_attention_layernorm", h, false),
        Param::linear(Role::Gate, "mlp.gate_proj", m, h, false),
        Param::linear(Role::Up, "mlp.up_proj", m, h, false),
        Param::linear(Role::Down, "mlp.down_proj", h, m, false),
    ]);
    Ok(spec)
}
