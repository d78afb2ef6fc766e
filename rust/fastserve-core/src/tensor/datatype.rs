//! The V2 protocol's tensor element types.

use std::fmt;

/// A V2 datatype. Fixed-size types travel as little-endian bytes; BYTES as a list of byte strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        Self::Bool,
        Self::Uint8,
        Self::Uint16,
        Self::Uint32,
        Self::Uint64,
        Self::Int8,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::Fp16,
        Self::Fp32,
        Self::Fp64,
        Self::Bytes,
    ];

    /// Parses the protocol spelling (`"FP32"`); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The one table of what each datatype is called where: the V2 protocol, NumPy, and Triton's
    /// model configuration (`TYPE_STRING` for BYTES, as Triton names it).
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Bool => ("BOOL", "bool", "TYPE_BOOL"),
            Self::Uint8 => ("UINT8", "uint8", "TYPE_UINT8"),
            Self::Uint16 => ("UINT16", "uint16", "TYPE_UINT16"),
            Self::Uint32 => ("UINT32", "uint32", "TYPE_UINT32"),
            Self::Uint64 => ("UINT64", "uint64", "TYPE_UINT64"),
            Self::Int8 => ("INT8", "int8", "TYPE_INT8"),
            Self::Int16 => ("INT16", "int16", "TYPE_INT16"),
            Self::Int32 => ("INT32", "int32", "TYPE_INT32"),
            Self::Int64 => ("INT64", "int64", "TYPE_INT64"),
            Self::Fp16 => ("FP16", "float16", "TYPE_FP16"),
            Self::Fp32 => ("FP32", "float32", "TYPE_FP32"),
            Self::Fp64 => ("FP64", "float64", "TYPE_FP64"),
            Self::Bytes => ("BYTES", "object", "TYPE_STRING"),
        }
    }

    pub fn as_str(self) -> &'static str {
        self.names().0
    }

    /// The NumPy dtype name (`object` arrays of `bytes` for BYTES).
    pub fn numpy_name(self) -> &'static str {
        self.names().1
    }

    /// The `data_type` name in Triton's model configuration.
    pub fn config_name(self) -> &'static str {
        self.names().2
    }

    /// Bytes per element, or `None` for the variable-size BYTES type.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::Uint8 | Self::Int8 => 1,
            Self::Uint16 | Self::Int16 | Self::Fp16 => 2,
            Self::Uint32 | Self::Int32 | Self::Fp32 => 4,
            Self::Uint64 | Self::Int64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("fp32"), None);
        assert_eq!(DataType::parse("FLOAT"), None);
    }
}
