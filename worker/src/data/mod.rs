//! Training data: documents -> token stream -> fixed-length windows -> batches.

pub mod sampler;
pub mod text;

pub use sampler::Sampler;
pub use text::TokenWindows;

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
    TooSmall { path: String, message: String },
}
