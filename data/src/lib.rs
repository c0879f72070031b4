//! ferrotune's data pipeline, shared by the coordinator (validation, cache building) and the
//! workers (reading the cache): JSON Lines or Parquet records → chat template → tokens with
//! loss-mask flags → packed sequences → a memory-mapped cache in shared storage → a weighted,
//! seeded, resumable mixture over datasets. No libtorch here; the worker turns sequences into tensors.

pub mod cache;
pub mod chat;
pub mod encode;
pub mod manifest;
pub mod mixture;
pub mod pack;
pub mod prepare;
pub mod record;
pub mod source;
pub mod tokenizer;
pub mod trainer_state;

pub use tokenizer::{SpecialTokens, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: String, message: String },
    #[error("{path}: {message}")]
    Cache { path: String, message: String },
    #[error("{path}: {message}")]
    Parquet { path: String, message: String },
    #[error("{0}")]
    Rejected(String),
}
