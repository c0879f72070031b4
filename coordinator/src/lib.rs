//! ferrotune's coordinator: a small control plane that never links libtorch.
//!
//! `config` reads cluster.yaml, `job` decides (a pure state machine), `driver` does the IO around
//! it with `server` (gRPC edge), `launcher` (worker processes) and `checkpoint` (commits);
//! `resume` picks and checks the checkpoint a relaunched job continues from.

pub mod checkpoint;
pub mod config;
pub mod datacheck;
pub mod deployment;
pub mod driver;
pub mod endpoint;
pub mod job;
pub mod launcher;
pub mod lease;
pub mod metrics;
mod natural;
pub mod observe;
pub mod plan;
pub mod progress;
pub mod restarts;
pub mod resume;
pub mod server;
pub mod status;

use std::path::PathBuf;

/// No worker binary to start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerBinaryError {
    #[error("FERROTUNE_WORKER_BIN={} is not a file", .0.display())]
    NotAFile(PathBuf),
    #[error("cannot locate this executable: {0}")]
    NoExecutable(std::io::Error),
    #[error("no worker binary at {}: build it with `cargo build --release -p ferrotune-worker`, or set cluster.worker_binary or FERROTUNE_WORKER_BIN", .0.display())]
    Missing(PathBuf),
}

/// Where the worker binary is: the config's `cluster.worker_binary`, else `FERROTUNE_WORKER_BIN`,
/// else `worker` next to this executable (how `cargo build` and the container images lay it out).
pub fn resolve_worker_binary(config: &config::JobConfig) -> Result<PathBuf, WorkerBinaryError> {
    if let Some(p) = &config.cluster.worker_binary {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("FERROTUNE_WORKER_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(WorkerBinaryError::NotAFile(p))
        };
    }
    let exe = std::env::current_exe().map_err(WorkerBinaryError::NoExecutable)?;
    let sibling = exe.with_file_name("worker");
    if sibling.is_file() {
        Ok(sibling)
    } else {
        Err(WorkerBinaryError::Missing(sibling))
    }
}
