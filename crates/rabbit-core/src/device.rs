//! Device and dtype selection from user-facing strings.

use std::fmt;
use std::str::FromStr;

use tch::{Device, Kind};

use crate::error::{CoreError, Result};

/// Where the decoder runs, as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA when present, else CPU.
    #[default]
    Auto,
    /// Host CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    CoreError::InvalidInput(format!(
                        "unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"
                    ))
                }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Resolves to a concrete libtorch device, failing clearly when CUDA is asked for but absent.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                let d = if tch::Cuda::is_available() {
                    Device::Cuda(0)
                } else {
                    Device::Cpu
                };
                tracing::info!(device = %device_name(d), "--device auto picked");
                Ok(d)
            }
            DeviceSpec::Cuda(n) => {
                let count = tch::Cuda::device_count();
                if count == 0 {
                    Err(CoreError::Device(format!(
                        "device cuda:{n} requested but CUDA is not available here \
                         (no GPU, no driver, or a CPU-only libtorch); use --device cpu or auto"
                    )))
                } else if n as i64 >= count {
                    Err(CoreError::Device(format!(
                        "device cuda:{n} requested but only {count} CUDA device(s) exist"
                    )))
                } else {
                    Ok(Device::Cuda(n))
                }
            }
        }
    }
}

/// `cpu` / `cuda:N`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_string(),
    }
}

/// Compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// float32.
    F32,
    /// bfloat16.
    BF16,
    /// float16.
    F16,
}

impl FromStr for DType {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            _ => Err(CoreError::InvalidInput(format!(
                "unknown dtype `{s}` (expected f32, bf16 or f16)"
            ))),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

impl DType {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::BF16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }

    /// From config.json's `torch_dtype`/`dtype` value.
    pub fn from_config_name(name: &str) -> Option<DType> {
        match name {
            "float32" => Some(DType::F32),
            "bfloat16" => Some(DType::BF16),
            "float16" => Some(DType::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            _ => 2,
        }
    }
}
