//! The worker's life in a job: join a generation, train until it ends, and when it ends in a
//! failure that may pass (a lost peer), register again for the next one — in the same
//! process, so libtorch, the page cache and the mapped data stay warm.
//!
//! `train::run` trains one generation; this module decides what happens after it.

use crate::agent::{
    heartbeat_loop, Agent, AgentError, GrpcReporter, HeartbeatTiming, Identity, Membership,
    Outcome, Signal,
};
use crate::checkpoint::RestoreError;
use crate::collective::nccl::{Nccl, NcclOptions};
use crate::collective::ring::{Ring, RingOptions};
use crate::device;
use crate::run::{set_threads, RunError, EXIT_ABORTED, EXIT_FAILED, EXIT_REFUSED};
use crate::spec::{Backend, Placement, TrainSpec};
use crate::storage;
use crate::train::{self, TrainError};
use anyhow::Context;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// How long a worker told to stop may take to end by itself before it exits regardless.
const ABORT_EXIT_AFTER: Duration = Duration::from_secs(5);
const FINISH_LIMIT: Duration = Duration::from_secs(10);

/// Joins generation after generation until the job is done (Ok) or this worker must exit.
pub fn run(
    runtime: &tokio::runtime::Runtime,
    agent: &Agent,
    me: &Identity,
    listener: &TcpListener,
    token: &str,
) -> Result<(), RunError> {
    let membership = Arc::new(Membership::default());
    let mut heartbeats_started = false;
    loop {
        let (placement, mut spec) = runtime.block_on(agent.register(me)).map_err(|e| {
            let code = match &e {
                // A wrong token, or a refusal the coordinator explains (another version, a
                // group that cannot use the configured device): another try meets the same.
                AgentError::Rpc(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition
                    ) =>
                {
                    EXIT_REFUSED
                }
                AgentError::Rpc(s) if s.code() == tonic::Code::Unavailable => EXIT_ABORTED,
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
            pid = std::process::id(),
            worker_id = %me.worker_id,
            host = %me.host,
            "joined the job"
        );
        if let Some(accum) = placement.grad_accum_steps {
            // A smaller group keeps the global batch.
            spec.grad_accum_steps = accum;
        }
        if !heartbeats_started {
            heartbeats_started = true;
            set_threads(&spec, &placement);
            let timing = HeartbeatTiming {
                interval: spec.heartbeat_interval,
                give_up: spec.heartbeat_timeout,
                exit_after: ABORT_EXIT_AFTER,
                exit_code: i32::from(EXIT_ABORTED),
            };
            runtime.spawn(heartbeat_loop(agent.clone(), membership.clone(), timing));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        membership.join(placement.rank, placement.generation, cancel.clone());
        let reporter = GrpcReporter::new(
            runtime.handle().clone(),
            agent.clone(),
            placement.clone(),
            membership.clone(),
        );
        let result = generation(
            &spec,
            &placement,
            listener,
            token,
            &me.host,
            &reporter,
            &membership,
            cancel,
        );
        // The coordinator hears every step and eval report before the outcome.
        reporter.flush();
        let error = match result {
            Ok(()) => {
                finish(runtime, agent, &placement, Outcome::default());
                return Ok(());
            }
            Err(e) => e,
        };
        match membership.signal() {
            // The coordinator has moved on: nothing to report, rejoin.
            Some(Signal::Rejoin) => {
                tracing::info!(
                    "generation {} ended ({error:#}); registering again",
                    placement.generation
                );
                membership.leave();
                continue;
            }
            Some(Signal::Stop(_)) => {
                finish(runtime, agent, &placement, outcome_of(&error));
                return Err(RunError::new(EXIT_ABORTED, error));
            }
            None => {}
        }
        let outcome = outcome_of(&error);
        let retriable = outcome.retriable;
        finish(runtime, agent, &placement, outcome);
        if !retriable {
            return Err(RunError::new(EXIT_REFUSED, error));
        }
        // The coordinator decides: re-form the group (rejoin) or end the job (stop). The
        // heartbeat loop gives up on a silent coordinator after the heartbeat timeout.
        let limit = spec.heartbeat_timeout * 2 + ABORT_EXIT_AFTER;
        match membership.wait_signal(limit) {
            Some(Signal::Rejoin) => {
                tracing::info!(
                    "generation {} ended; registering again",
                    placement.generation
                );
                membership.leave();
            }
            Some(Signal::Stop(_)) => return Err(RunError::new(EXIT_ABORTED, error)),
            None => return Err(RunError::new(EXIT_FAILED, error)),
        }
    }
}

/// One generation: check the storage, choose the device, connect the collective, train.
#[allow(clippy::too_many_arguments)]
fn generation(
    spec: &TrainSpec,
    placement: &Placement,
    listener: &TcpListener,
    token: &str,
    host: &str,
    reporter: &GrpcReporter,
    membership: &Membership,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    storage::check(spec, placement.resume_from.as_deref(), host)?;
    let device = device::choose(&spec.device_kind, placement.local_rank)
        .map_err(|e| TrainError::Setup(e.to_string()))?;
    let placement = &Placement {
        device,
        ..placement.clone()
    };
    let summary = match &placement.backend {
        Backend::Ring => {
            let options = RingOptions {
                timeout: spec.collective_timeout,
                bucket_bytes: spec.bucket_bytes,
                token: token.to_string(),
                generation: placement.generation,
                cancel,
            };
            let listener = listener
                .try_clone()
                .context("sharing the collective's listener")?;
            let mut ring = Ring::connect(
                listener,
                placement.rank,
                placement.world_size,
                &placement.next_peer_address,
                &options,
            )
            .map_err(TrainError::from)?;
            membership.set_ring(ring.abort_handle());
            let summary = train::run(spec, placement, &mut ring, reporter);
            membership.set_ring(None);
            summary
        }
        Backend::Nccl { unique_id } => {
            // The generation's end sets `cancel`, which the communicator polls while it waits:
            // it aborts itself (ncclCommAbort) on the training thread.
            let options = NcclOptions {
                timeout: spec.collective_timeout,
                abort: cancel,
            };
            let mut nccl = Nccl::connect(
                unique_id,
                placement.rank,
                placement.world_size,
                device,
                options,
            )
            .map_err(TrainError::from)?;
            train::run(spec, placement, &mut nccl, reporter)
        }
    };
    let summary = summary?;
    tracing::info!(last_loss = summary.last_loss, "training finished");
    Ok(())
}

/// What the coordinator is told about an error, and whether a new generation may get past it:
/// a lost peer, a collective timeout, a stop, a checkpoint refused, unwritable or unreadable
/// (the restart takes the one before) may; a model, data, storage or setup error would come
/// back in every generation.
fn outcome_of(error: &anyhow::Error) -> Outcome {
    let train_error = error.downcast_ref::<TrainError>();
    let damaged_file = match train_error {
        Some(TrainError::Restore(RestoreError::Damaged { file, .. })) => {
            Some(file.to_string_lossy().into_owned())
        }
        _ => None,
    };
    let retriable = matches!(
        train_error,
        Some(
            TrainError::Collective(_)
                | TrainError::Aborted(_)
                | TrainError::Checkpoint(_)
                | TrainError::Write(_)
                | TrainError::Restore(_)
        )
    );
    Outcome {
        error: Some(format!("{error:#}")),
        damaged_file,
        retriable,
    }
}

fn finish(
    runtime: &tokio::runtime::Runtime,
    agent: &Agent,
    placement: &Placement,
    outcome: Outcome,
) {
    let finished = runtime.block_on(agent.finish(placement, &outcome, FINISH_LIMIT));
    if let Err(e) = finished {
        tracing::warn!("could not report the outcome to the coordinator: {e}");
    }
}
