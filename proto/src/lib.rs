//! Generated types and stubs of the `ferrotune.v1` gRPC API.
//!
//! Only the coordinator's `server` module and the worker's `agent` module use these types; the
//! rest of both crates works with validated domain types. The package is versioned: fields are
//! added, never renumbered.

pub mod v1 {
    tonic::include_proto!("ferrotune.v1");
}

/// gRPC metadata key that carries the per-job token on every call.
pub const TOKEN_METADATA_KEY: &str = "x-ferrotune-token";
/// Environment variable through which launchers hand the job token to a worker (not argv, so it
/// does not show in `ps`).
pub const TOKEN_ENV: &str = "FERROTUNE_JOB_TOKEN";
/// The ferrotune release both binaries are built from. A worker of another release is refused at
/// registration: the API is versioned, but the training semantics behind it are not.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
