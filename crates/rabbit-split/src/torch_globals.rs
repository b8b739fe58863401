//! The whitelist of Python globals a `torch.save`d state dict may refer to, and what each means.
//! Anything else is refused by name: the pickle reader never calls or imports anything, and a
//! name outside this list means the file is not a plain state dict of tensors.

use crate::dtype::Dtype;
use crate::torch_pickle::PickleError;

/// The Python globals a state dict may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    /// `torch.<X>Storage` (typed) or `torch.storage.UntypedStorage` (`U8`).
    Storage(Dtype),
    /// A `torch` dtype object (`torch.float8_e4m3fn`), argument of `_rebuild_tensor_v3`.
    TorchDtype(Dtype),
}

/// The whitelisted global `module.name`, or [`PickleError::Forbidden`] naming it.
pub(crate) fn resolve_global(module: &str, name: &str) -> Result<Global, PickleError> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => {
            Global::Storage(Dtype::U8)
        }
        ("torch", storage) if storage.ends_with("Storage") => match storage {
            "DoubleStorage" => Global::Storage(Dtype::F64),
            "FloatStorage" => Global::Storage(Dtype::F32),
            "HalfStorage" => Global::Storage(Dtype::F16),
            "BFloat16Storage" => Global::Storage(Dtype::BF16),
            "LongStorage" => Global::Storage(Dtype::I64),
            "IntStorage" => Global::Storage(Dtype::I32),
            "ShortStorage" => Global::Storage(Dtype::I16),
            "CharStorage" => Global::Storage(Dtype::I8),
            "ByteStorage" => Global::Storage(Dtype::U8),
            "BoolStorage" => Global::Storage(Dtype::BOOL),
            "ComplexFloatStorage" => Global::Storage(Dtype::C64),
            _ => return Err(PickleError::Forbidden(format!("{module}.{name}"))),
        },
        ("torch", dtype) => Global::TorchDtype(match dtype {
            "float64" | "double" => Dtype::F64,
            "float32" | "float" => Dtype::F32,
            "float16" | "half" => Dtype::F16,
            "bfloat16" => Dtype::BF16,
            "int64" | "long" => Dtype::I64,
            "int32" | "int" => Dtype::I32,
            "int16" | "short" => Dtype::I16,
            "int8" => Dtype::I8,
            "uint8" => Dtype::U8,
            "uint16" => Dtype::U16,
            "uint32" => Dtype::U32,
            "uint64" => Dtype::U64,
            "bool" => Dtype::BOOL,
            "complex64" | "cfloat" => Dtype::C64,
            "float8_e4m3fn" => Dtype::F8_E4M3,
            "float8_e5m2" => Dtype::F8_E5M2,
            "float8_e8m0fnu" => Dtype::F8_E8M0,
            _ => return Err(PickleError::Forbidden(format!("{module}.{name}"))),
        }),
        _ => return Err(PickleError::Forbidden(format!("{module}.{name}"))),
    };
    Ok(g)
}
