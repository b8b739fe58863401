//! Architecture registry keyed on config.json `architectures[0]`.

use std::path::Path;

use crate::arch::Architecture;
use crate::baichuan::Baichuan;
use crate::chatglm::ChatGlm;
use crate::config::{GenerationConfig, HfConfig};
use crate::deepseek::{DEEPSEEK_V2, DEEPSEEK_V3};
use crate::error::{ModelError, Result};
use crate::gemma::{Gemma2, Gemma3, Gemma3Multimodal};
use crate::glm::{Glm, Glm4};
use crate::gpt_oss::GptOss;
use crate::internlm::{InternLm, InternLm2};
use crate::mixtral::Mixtral;
use crate::phi::{Phi, Phi3};
use crate::qwen1::Qwen1;
use crate::qwen_moe::{QWEN2_MOE, QWEN3_MOE};
use crate::spec::ModelSpec;
use crate::{llama::LLAMA, mistral::MISTRAL, qwen2::QWEN2, qwen3::QWEN3};

/// Implemented families: the one place that says which exist.
static SUPPORTED: &[&dyn Architecture] = &[
    &QWEN2,
    &QWEN3,
    &LLAMA,
    &MISTRAL,
    &Gemma2,
    &Gemma3,
    &Gemma3Multimodal,
    &Phi3,
    &Phi,
    &Glm4,
    &Glm,
    &ChatGlm,
    &InternLm2,
    &InternLm,
    &Baichuan,
    &Qwen1,
    &Mixtral,
    &QWEN2_MOE,
    &QWEN3_MOE,
    &DEEPSEEK_V2,
    &DEEPSEEK_V3,
    &GptOss,
];

/// Families named by the anchors' documentation that are recognised but not implemented yet:
/// they get a clear "not yet supported" error rather than being routed to a look-alike.
pub static NOT_YET_SUPPORTED: &[&str] = &["BaiChuanForCausalLM"];

/// Names of the implemented architectures.
pub fn supported_architectures() -> Vec<&'static str> {
    SUPPORTED
        .iter()
        .flat_map(|a| std::iter::once(a.name()).chain(a.other_names().iter().copied()))
        .collect()
}

/// Every implemented family.
pub fn families() -> &'static [&'static dyn Architecture] {
    SUPPORTED
}

/// Finds the implementation for `architectures[0]`.
pub fn lookup(architecture: &str) -> Result<&'static dyn Architecture> {
    if let Some(a) = SUPPORTED
        .iter()
        .find(|a| a.name() == architecture || a.other_names().contains(&architecture))
    {
        return Ok(*a);
    }
    let supported = supported_architectures().join(", ");
    if NOT_YET_SUPPORTED.contains(&architecture) {
        Err(ModelError::NotYetSupported {
            architecture: architecture.to_string(),
            supported,
        })
    } else {
        Err(ModelError::UnknownArchitecture {
            architecture: architecture.to_string(),
            supported,
        })
    }
}

/// Resolves a parsed config (and optional generation config) into a spec.
pub fn spec_from_config(cfg: &HfConfig, gen: Option<&GenerationConfig>) -> Result<ModelSpec> {
    spec_in_dir(cfg, gen, None)
}

/// [`spec_from_config`] for the checkpoint in `dir`, whose other files may settle what the
/// config leaves open (see [`Architecture::spec_in_dir`]).
fn spec_in_dir(
    cfg: &HfConfig,
    gen: Option<&GenerationConfig>,
    dir: Option<&Path>,
) -> Result<ModelSpec> {
    let arch = match cfg.architectures.as_slice() {
        [one] => one.as_str(),
        [] => {
            return Err(ModelError::UnknownArchitecture {
                architecture: "<config.json has no `architectures`>".into(),
                supported: supported_architectures().join(", "),
            })
        }
        many => {
            return Err(ModelError::UnknownArchitecture {
                architecture: format!("{many:?} (exactly one architecture expected)"),
                supported: supported_architectures().join(", "),
            })
        }
    };
    let family = lookup(arch)?;
    let spec = match dir {
        Some(d) => family.spec_in_dir(cfg, gen, d)?,
        None => family.spec(cfg, gen)?,
    };
    let reads_mxfp4 = spec.tensors.layer.iter().any(|p| p.role.is_packed());
    if spec.mxfp4 && !reads_mxfp4 {
        return Err(ModelError::Unsupported {
            architecture: arch.to_string(),
            reason: "`quantization_config`: quant_method \"mxfp4\" is not supported for this architecture".into(),
        });
    }
    let regrouped = spec
        .tensors
        .layer
        .iter()
        .chain(&spec.tensors.dense_layer)
        .any(|p| p.row_order.is_some());
    if spec.fp8_block.is_some() && regrouped {
        // The rows are regrouped at split time; their block scales would not follow.
        return Err(ModelError::Unsupported {
            architecture: arch.to_string(),
            reason: "`quantization_config`: fp8 weights are not supported for this architecture (its fused rows are regrouped)".into(),
        });
    }
    Ok(spec)
}

/// The defaults of the text model inside a wrapper of `model_type` (e.g. Gemma 3's multimodal
/// checkpoints), from the family that reads it.
pub fn text_config_defaults(model_type: &str) -> Option<serde_json::Value> {
    SUPPORTED
        .iter()
        .find(|a| a.variant().model_type == model_type)
        .and_then(|a| a.text_config_defaults())
}

/// The config keys the family of `architecture` spells its own way (see
/// [`Architecture::config_aliases`]).
pub fn config_aliases(architecture: &str) -> &'static [(&'static str, &'static str)] {
    SUPPORTED
        .iter()
        .find(|a| a.name() == architecture || a.other_names().contains(&architecture))
        .map_or(&[], |a| a.config_aliases())
}

/// Parses config.json text as [`load_spec`] reads it (wrapper defaults, family key spellings).
pub fn parse_config(text: &str) -> std::result::Result<HfConfig, String> {
    HfConfig::parse_hooked(text, &text_config_defaults, &config_aliases)
}

/// Reads `config.json` and `generation_config.json` from a model directory and resolves them.
pub fn load_spec(dir: &Path) -> Result<ModelSpec> {
    let cfg = HfConfig::load_hooked(dir, &text_config_defaults, &config_aliases)?;
    let gen = GenerationConfig::load(dir)?;
    spec_in_dir(&cfg, gen.as_ref(), Some(dir)).map_err(|e| match e {
        ModelError::Unsupported {
            architecture,
            reason,
        } => ModelError::BadConfig {
            path: dir.join("config.json"),
            reason: format!("{architecture}: {reason}"),
        },
        other => other,
    })
}
