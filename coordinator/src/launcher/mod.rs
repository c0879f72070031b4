//! Launchers start and stop worker processes; the job logic never knows which one is in use.
//!
//! A worker needs only the coordinator's address and the job token to join, so anything that can
//! start a process with those (this module, an sbatch script, a Kubernetes Job) can host it.

mod children;
pub mod external;
pub mod local;
pub mod slurm;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything a launcher needs to start the workers of one job.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub world_size: u32,
    /// gRPC endpoint workers dial, e.g. `http://127.0.0.1:41234`.
    pub coordinator_url: String,
    pub token: String,
    pub worker_binary: PathBuf,
    /// Where each worker's stdout/stderr is kept (`worker-<i>.log`).
    pub log_dir: PathBuf,
}

impl LaunchPlan {
    fn create_log_dir(&self) -> Result<(), LaunchError> {
        std::fs::create_dir_all(&self.log_dir).map_err(|source| LaunchError::LogDir {
            dir: self.log_dir.clone(),
            source,
        })
    }
}

/// What a launcher reports about the processes it manages.
#[derive(Debug, Clone, PartialEq)]
pub enum LauncherEvent {
    Exited {
        worker_id: String,
        success: bool,
        /// The exit code, when the process exited rather than being killed by a signal.
        code: Option<i32>,
        /// "exited with code 1", "was killed by signal 9 (SIGKILL)".
        status: String,
        last_line: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start worker binary {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create log directory {}: {source}", dir.display())]
    LogDir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Launcher: Send {
    /// Starts every worker of the plan. Exits are reported on `events`.
    fn spawn(
        &mut self,
        plan: &LaunchPlan,
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError>;

    /// Starts new instances of these workers (after a restart: they were lost), killing what
    /// is left of the old ones. Launchers that own no process (external) do nothing: the
    /// replacement registers by itself (a Kubernetes Job restarts its pod).
    fn replace(
        &mut self,
        _plan: &LaunchPlan,
        _worker_ids: &[String],
        _events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        Ok(())
    }

    /// Asks every worker to stop, forces those still running after `grace`, and returns only
    /// once no worker process is left.
    fn stop_all(&mut self, grace: Duration) -> BoxFuture<'_, ()>;

    /// Whether this launcher owns the worker processes and reports every exit. When it does not
    /// (external workers), success is decided by the workers' own Finish reports alone.
    fn tracks_exits(&self) -> bool {
        true
    }
}
