//! The Llama-family decoder, written for one device. It knows nothing about gRPC, collectives
//! or files beyond loading and saving its own weights.

pub mod config;
pub mod io;
pub mod llama;

pub use config::LlamaConfig;
pub use llama::Llama;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: invalid config.json: {source}")]
    ConfigJson {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: `{field}`: {message}")]
    Unsupported {
        path: String,
        field: &'static str,
        message: String,
    },
    #[error("{path}: {source}")]
    Weights { path: String, source: tch::TchError },
}
