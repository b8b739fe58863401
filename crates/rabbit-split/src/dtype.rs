//! Element types of safetensors tensors, named exactly as in safetensors headers. Our own enum
//! (rather than `safetensors::Dtype`) so the manifest's serde format is under this crate's control.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! dtypes {
    ($($(#[$doc:meta])* $v:ident = $name:literal, $bits:literal;)*) => {
        /// A safetensors element type. Names (`"F32"`, `"BF16"`, ...) match safetensors headers.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Dtype {
            $($(#[$doc])* $v,)*
        }

        impl Dtype {
            /// Every dtype, for iteration in tests and tools.
            pub const ALL: &'static [Dtype] = &[$(Dtype::$v,)*];

            /// The safetensors name (`"F32"`, `"BF16"`, ...).
            pub fn name(&self) -> &'static str {
                match self { $(Dtype::$v => $name,)* }
            }

            /// Bits per element (4 and 6 for the packed MX float types).
            pub fn bits(&self) -> usize {
                match self { $(Dtype::$v => $bits,)* }
            }
        }

        impl FromStr for Dtype {
            type Err = ParseDtypeError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Dtype::$v),)*
                    _ => Err(ParseDtypeError(s.to_string())),
                }
            }
        }
    };
}

dtypes! {
    /// Boolean (one byte).
    BOOL = "BOOL", 8;
    /// MX FP4, packed two per byte.
    F4 = "F4", 4;
    /// MX FP6 (E2M3), packed.
    F6_E2M3 = "F6_E2M3", 6;
    /// MX FP6 (E3M2), packed.
    F6_E3M2 = "F6_E3M2", 6;
    /// Unsigned byte.
    U8 = "U8", 8;
    /// Signed byte.
    I8 = "I8", 8;
    /// FP8 E5M2.
    F8_E5M2 = "F8_E5M2", 8;
    /// FP8 E4M3.
    F8_E4M3 = "F8_E4M3", 8;
    /// FP8 E8M0 (MX scale).
    F8_E8M0 = "F8_E8M0", 8;
    /// Signed 16-bit integer.
    I16 = "I16", 16;
    /// Unsigned 16-bit integer.
    U16 = "U16", 16;
    /// IEEE half precision.
    F16 = "F16", 16;
    /// bfloat16.
    BF16 = "BF16", 16;
    /// Signed 32-bit integer.
    I32 = "I32", 32;
    /// Unsigned 32-bit integer.
    U32 = "U32", 32;
    /// IEEE single precision.
    F32 = "F32", 32;
    /// Complex with two f32 parts.
    C64 = "C64", 64;
    /// IEEE double precision.
    F64 = "F64", 64;
    /// Signed 64-bit integer.
    I64 = "I64", 64;
    /// Unsigned 64-bit integer.
    U64 = "U64", 64;
}

impl Dtype {
    /// Bytes per element, rounded up to 1 for the packed sub-byte types. This is also the natural
    /// alignment the split guarantees for tensors of this dtype.
    pub fn size_bytes(&self) -> usize {
        self.bits().div_ceil(8)
    }

    /// Storage size in bytes of `numel` elements, or `None` when that is not a whole number of
    /// bytes (possible for packed sub-byte types) or overflows.
    pub fn byte_len(&self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bits() as u64)?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

/// Number of elements of a shape (1 for a scalar), `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
}

/// Error of [`Dtype::from_str`]: carries the unrecognised string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDtypeError(pub String);

impl fmt::Display for ParseDtypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown dtype {:?}", self.0)
    }
}

impl std::error::Error for ParseDtypeError {}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Dtype {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes() {
        for &d in Dtype::ALL {
            assert_eq!(d.name().parse::<Dtype>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.name()));
            assert_eq!(serde_json::from_str::<Dtype>(&json).unwrap(), d);
        }
        assert_eq!(Dtype::F32.size_bytes(), 4);
        assert_eq!(Dtype::BF16.size_bytes(), 2);
        assert_eq!(Dtype::F64.size_bytes(), 8);
        assert_eq!(Dtype::BOOL.size_bytes(), 1);
        assert_eq!(Dtype::F4.size_bytes(), 1);
        assert_eq!(Dtype::F4.byte_len(3), None);
        assert_eq!(Dtype::F4.byte_len(4), Some(2));
        assert_eq!(Dtype::BF16.byte_len(3), Some(6));
        assert!("F33".parse::<Dtype>().is_err());
        assert!(serde_json::from_str::<Dtype>("\"bf16\"").is_err());
    }

    #[test]
    fn names_match_the_safetensors_crate() {
        // Every dtype the safetensors crate writes must parse here with the same element size.
        use safetensors::Dtype as S;
        let theirs = [
            (S::BOOL, "BOOL"),
            (S::F4, "F4"),
            (S::F6_E2M3, "F6_E2M3"),
            (S::F6_E3M2, "F6_E3M2"),
            (S::U8, "U8"),
            (S::I8, "I8"),
            (S::F8_E5M2, "F8_E5M2"),
            (S::F8_E4M3, "F8_E4M3"),
            (S::F8_E8M0, "F8_E8M0"),
            (S::I16, "I16"),
            (S::U16, "U16"),
            (S::F16, "F16"),
            (S::BF16, "BF16"),
            (S::I32, "I32"),
            (S::U32, "U32"),
            (S::F32, "F32"),
            (S::C64, "C64"),
            (S::F64, "F64"),
            (S::I64, "I64"),
            (S::U64, "U64"),
        ];
        for (s, name) in theirs {
            assert_eq!(format!("{s:?}"), name);
            assert_eq!(name.parse::<Dtype>().unwrap().bits(), s.bitsize(), "{name}");
        }
        assert_eq!(theirs.len(), Dtype::ALL.len());
    }

    #[test]
    fn numel_handles_scalars_and_overflow() {
        assert_eq!(numel(&[]), Some(1));
        assert_eq!(numel(&[2, 3, 0]), Some(0));
        assert_eq!(numel(&[usize::MAX, 4]), None);
    }
}
