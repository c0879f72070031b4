//! The three floating-point storage types Hugging Face checkpoints use, and their names in
//! config.json, safetensors headers and libtorch.

use tch::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    /// `torch_dtype` / `dtype` values in config.json (and the short names users type).
    pub fn from_hf_name(name: &str) -> Option<DType> {
        match name {
            "float32" | "fp32" | "float" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::Bf16),
            "float16" | "fp16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        match dtype {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::Bf16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::Bf16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
        }
    }
}
