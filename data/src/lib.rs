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

/// Logit elements per chunk of the workers' training loss (worker/src/model/loss.rs): the
/// batch's logits are never whole. Here so that `coordinator plan`, which never links libtorch,
/// estimates the same chunks.
pub const LOSS_CHUNK_ELEMENTS: i64 = 1 << 25;

/// Positions per loss chunk for `batch` rows of `vocab` logits.
pub fn loss_chunk_positions(batch: i64, vocab: i64) -> i64 {
    (LOSS_CHUNK_ELEMENTS / (batch * vocab).max(1)).max(1)
}

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
