//! `worker run`: bind the collective's port, register, heartbeat, train, report the outcome.

use crate::agent::{heartbeat_loop, Agent, AgentError, GrpcReporter, HeartbeatTiming, Identity};
use crate::collective::ring::{Ring, RingOptions};
use crate::storage;
use crate::train;
use anyhow::Context;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A training error; the coordinator has been told (or could not be).
pub const EXIT_FAILED: u8 = 1;
/// Bad flags, or refused by the coordinator (wrong job token): retrying the same worker cannot
/// help.
pub const EXIT_REFUSED: u8 = 2;
/// The coordinator ended the job, or could not be reached for the heartbeat timeout.
pub const EXIT_ABORTED: u8 = 3;
/// How long a worker told to stop may take to end by itself before it exits regardless.
const ABORT_EXIT_AFTER: Duration = Duration::from_secs(5);
/// How long to keep dialling a coordinator that is not up yet: it may be validating and
/// tokenizing large datasets before it serves.
const CONNECT_PATIENCE: Duration = Duration::from_secs(600);
const FINISH_LIMIT: Duration = Duration::from_secs(10);

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
    fn new(code: u8, error: anyhow::Error) -> Self {
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
    // Bound before registering, so the peer address we announce already accepts connections.
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
    let (placement, spec) = runtime.block_on(agent.register(&me)).map_err(|e| {
        let code = match &e {
            AgentError::Rpc(s) if s.code() == tonic::Code::Unauthenticated => EXIT_REFUSED,
            _ => EXIT_FAILED,
        };
        RunError::new(
            code,
            anyhow::Error::new(e).context("registering with the coordinator"),
        )
    })?;
    tracing::info!(
        rank = placement.rank,
        world_size = placement.world_size,
        generation = placement.generation,
        worker_id = %args.worker_id,
        host = %args.host,
        "joined the job"
    );

    let abort = Arc::new(Mutex::new(None));
    let current_step = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let timing = HeartbeatTiming {
        interval: spec.heartbeat_interval,
        give_up: spec.heartbeat_timeout,
        exit_after: ABORT_EXIT_AFTER,
        exit_code: i32::from(EXIT_ABORTED),
    };
    runtime.spawn(heartbeat_loop(
        agent.clone(),
        placement.clone(),
        timing,
        abort.clone(),
        current_step.clone(),
    ));

    let reporter = GrpcReporter::new(
        runtime.handle().clone(),
        agent.clone(),
        placement.clone(),
        abort.clone(),
        current_step.clone(),
    );
    let outcome = (|| -> anyhow::Result<()> {
        storage::check(&spec, &args.host)?;
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
        let options = RingOptions {
            timeout: spec.collective_timeout,
            bucket_bytes: spec.bucket_bytes,
            token: args.token.clone(),
            generation: placement.generation,
        };
        let mut ring = Ring::connect(
            listener,
            placement.rank,
            placement.world_size,
            &placement.next_peer_address,
            &options,
        )?;
        let summary = train::run(&spec, &placement, &mut ring, &reporter)?;
        tracing::info!(last_loss = summary.last_loss, "training finished");
        Ok(())
    })();

    // The coordinator hears every step and eval report before the outcome.
    reporter.flush();
    let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
    let damaged_file =
        outcome
            .as_ref()
            .err()
            .and_then(|e| match e.downcast_ref::<train::TrainError>() {
                Some(train::TrainError::DamagedCheckpoint { file, .. }) => {
                    Some(file.to_string_lossy().into_owned())
                }
                _ => None,
            });
    let finished = runtime.block_on(agent.finish(
        placement.rank,
        placement.generation,
        error,
        damaged_file,
        FINISH_LIMIT,
    ));
    if let Err(e) = finished {
        tracing::warn!("could not report the outcome to the coordinator: {e}");
    }
    let aborted = abort.lock().ok().and_then(|a| a.clone()).is_some();
    outcome.map_err(|e| RunError::new(if aborted { EXIT_ABORTED } else { EXIT_FAILED }, e))
}
