//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 3), written for one device. It knows
//! nothing about gRPC, collectives or training; `io` loads and saves Hugging Face checkpoints.

pub mod config;
pub mod dtype;
pub mod io;
mod layers;
pub mod llama;
pub mod loss;
pub mod rope;

pub use config::ModelConfig;
pub use dtype::DType;
pub use llama::{KvCache, Llama, Packing};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: `{field}`: {message}")]
    Config {
        path: String,
        field: String,
        message: String,
    },
    /// A problem with the weight files: a missing shard or tensor, a wrong shape, a truncated
    /// or corrupt file.
    #[error("{path}: {message}")]
    Weights { path: String, message: String },
}
