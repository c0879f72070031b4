//! `worker run`: bind the collective's port, reach the coordinator, then train generation by
//! generation (`session`) until the job is done; the exit code says how it ended.

use crate::agent::{Agent, Identity};
use crate::session;
use crate::spec::{Placement, TrainSpec};
use anyhow::Context;
use std::net::IpAddr;
use std::time::Duration;

// Exit codes: stable, because schedulers map them (Kubernetes' podFailurePolicy): 0 done; 2
// permanent, a new process would fail the same way; 3 the job ended or the coordinator is
// gone; anything else (1, a signal) a crash worth retrying.

/// A training error that a new attempt may get past; the coordinator has been told (or could
/// not be).
pub const EXIT_FAILED: u8 = 1;
/// Permanent: bad flags, refused by the coordinator (wrong job token, another version), or a
/// configuration or data error that every generation would meet again.
pub const EXIT_REFUSED: u8 = 2;
/// The coordinator ended the job, or could not be reached for the heartbeat timeout.
pub const EXIT_ABORTED: u8 = 3;
/// How long to keep dialling a coordinator that is not up yet: it may be validating and
/// tokenizing large datasets before it serves.
const CONNECT_PATIENCE: Duration = Duration::from_secs(600);

pub struct RunArgs {
    pub coordinator: String,
    pub token: String,
    pub worker_id: String,
    pub host: String,
    pub local_index: u32,
    /// Address the collective listens on.
    pub bind: IpAddr,
    /// Address peers should dial.
    pub advertise: String,
}

/// Why `worker run` ended unsuccessfully, with the process exit code that says so.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RunError {
    pub message: String,
    code: u8,
}

impl RunError {
    pub(crate) fn new(code: u8, error: anyhow::Error) -> Self {
        RunError {
            message: format!("{error:#}"),
            code,
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.code
    }
}

pub fn run(args: RunArgs) -> Result<(), RunError> {
    let failed = |e: anyhow::Error| RunError::new(EXIT_FAILED, e);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(failed)?;
    // Bound before registering, so the peer address we announce already accepts connections;
    // kept for the life of the process, so a worker that rejoins keeps its address.
    let listener = std::net::TcpListener::bind((args.bind, 0))
        .with_context(|| format!("binding the collective on {}", args.bind))
        .map_err(|e| RunError::new(EXIT_REFUSED, e))?;
    let port = listener.local_addr().map_err(|e| failed(e.into()))?.port();
    let peer_address = match args.advertise.parse::<IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{}:{port}", args.advertise),
    };
    let agent = runtime
        .block_on(Agent::connect(
            &args.coordinator,
            &args.token,
            CONNECT_PATIENCE,
        ))
        .map_err(|e| failed(e.into()))?;
    let me = Identity {
        worker_id: args.worker_id.clone(),
        host: args.host.clone(),
        local_index: args.local_index,
        peer_address,
    };
    session::run(&runtime, &agent, &me, &listener, &args.token)
}

/// Intra-op threads for this worker: the spec's, what Slurm granted the task, or this host's
/// cores shared among its workers.
pub(crate) fn set_threads(spec: &TrainSpec, placement: &Placement) {
    let threads = if spec.intra_op_threads > 0 {
        spec.intra_op_threads
    } else if let Some(cpus) = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        // What the scheduler granted this task (Slurm does not always bind it to them).
        cpus
    } else {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / placement.local_world_size.max(1)).max(1)
    };
    tch::set_num_threads(threads as i32);
    tch::set_num_interop_threads(1);
}
