//! Runs one job: serves the gRPC API, starts workers through a launcher, feeds every event into
//! the [`Job`] state machine and carries out its actions. All IO of the coordinator is here or
//! below (server, launcher, checkpoint); the decisions are in `job`.

use crate::checkpoint;
use crate::config::JobConfig;
use crate::endpoint;
use crate::job::devices::Backend;
use crate::job::{Action, Event, Job, JobParams, Outcome};
use crate::launcher::{LaunchPlan, Launcher, LauncherEvent};
use crate::lease::Lease;
use crate::observe::{self, Observer};
use crate::progress::Progress;
use crate::restarts;
use crate::resume;
use crate::server::{self, Inbound, Reply};
use ferrotune_proto::v1::coordinator_server::SERVICE_NAME as COORDINATOR;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tasks::{drain, keep_lease, CommitDone};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic_health::ServingStatus::{NotServing, Serving};

mod tasks;

/// How long workers get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(200);
/// The drain after a job with external workers lasts at least min(interval, this) for
/// stragglers, and at most two heartbeat intervals plus this.
const DRAIN_MIN: Duration = Duration::from_millis(500);
const SERVER_CLOSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot listen for workers: {0}")]
    Listen(std::io::Error),
    #[error("cannot prepare checkpoint directory {}: {source}", dir.display())]
    CheckpointDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Launch(#[from] crate::launcher::LaunchError),
}

pub struct JobReport {
    pub outcome: Outcome,
    /// A checkpoint a worker found damaged (its directory, the file) that is still in place.
    pub damaged: Option<(String, String)>,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
}

/// How the workers of one job are reached and started.
pub struct Startup {
    /// Bound by `endpoint::bind` before anything else was done.
    pub listener: std::net::TcpListener,
    /// `observe.listen`, bound as early: the dashboard, /metrics and /api/status.
    pub observe_listener: std::net::TcpListener,
    pub token: String,
    pub worker_binary: PathBuf,
    pub launcher: Box<dyn Launcher>,
    /// This coordinator's hold on checkpoint.dir, taken before anything was written there.
    pub lease: Lease,
    /// Per-GPU memory estimate, checked against the GPUs the workers report (None: no check).
    pub gpu_need: Option<crate::job::devices::GpuNeed>,
}

pub async fn run(config: JobConfig, startup: Startup) -> Result<JobReport, DriverError> {
    let Startup {
        listener,
        observe_listener,
        token,
        worker_binary,
        mut launcher,
        lease,
        gpu_need,
    } = startup;
    let lease = Arc::new(lease);
    let (lease_lost_tx, mut lease_lost) = mpsc::unbounded_channel::<String>();
    let renewal = tokio::spawn(keep_lease(lease.clone(), lease_lost_tx));
    std::fs::create_dir_all(&config.checkpoint_dir).map_err(|source| {
        DriverError::CheckpointDir {
            dir: config.checkpoint_dir.clone(),
            source,
        }
    })?;
    match checkpoint::remove_stale_staging(&config.checkpoint_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "removed {n} uncommitted checkpoint staging directories from an earlier run"
        ),
        Err(e) => tracing::warn!("could not clean stale staging directories: {e}"),
    }

    let listener = TcpListener::from_std(listener).map_err(DriverError::Listen)?;
    let local = listener.local_addr().map_err(DriverError::Listen)?;
    let url = endpoint::worker_url(local, config.cluster.advertise.as_deref());
    let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(1024);
    let service = server::build(inbound_tx, &config, token.clone());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    // grpc.health.v1 without the job token: Kubernetes' gRPC readiness probe cannot send one.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(COORDINATOR, Serving).await;
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = shutdown_rx.await;
                },
            )
            .await
    });
    tracing::info!(address = %local, job = %config.name, world_size = config.cluster.world_size, "coordinator listening");
    println!("workers dial: {url}");
    let observer = Observer::new(
        &config.name,
        config.steps,
        config.cluster.world_size,
        config.cluster.heartbeat_interval,
        &config.checkpoint_dir,
    );
    let (observe_stop, observe_stopped) = oneshot::channel::<()>();
    let observe_addr = observe_listener.local_addr().map_err(DriverError::Listen)?;
    observe::start(observe_listener, observer.clone(), observe_stopped)
        .map_err(DriverError::Listen)?;
    let dashboard = endpoint::worker_url(observe_addr, config.cluster.advertise.as_deref());
    println!("dashboard: {dashboard}/");
    // For `coordinator status <dir>`; a few bytes, before the event loop starts.
    let dashboard_file = config.checkpoint_dir.join(crate::status::DASHBOARD_FILE);
    if let Err(e) = std::fs::write(&dashboard_file, format!("{dashboard}/\n")) {
        tracing::warn!("cannot write {}: {e}", dashboard_file.display());
    }

    let (launcher_tx, mut launcher_events) = mpsc::unbounded_channel();
    let mut progress = Progress::new(config.steps, config.log_every_steps as u64);
    if let Some(r) = &config.resume {
        progress.resumed(r.step, &r.dir);
        observer.resumed(r.step, &r.dir);
    }
    let plan = LaunchPlan {
        world_size: config.cluster.world_size,
        coordinator_url: url,
        token,
        worker_binary,
        log_dir: config.checkpoint_dir.join("logs"),
    };
    let restarts_done = if config.resume_keeps_restarts {
        restarts::read(&config.checkpoint_dir)
    } else {
        0
    };
    let mut job = Job::new(
        JobParams {
            world_size: config.cluster.world_size,
            heartbeat_timeout: config.cluster.heartbeat_timeout,
            rendezvous_timeout: config.cluster.rendezvous_timeout,
            rejoin_timeout: config.cluster.rejoin_timeout,
            step_timeout: config.cluster.step_timeout,
            failure_grace: Duration::from_secs(1),
            version: ferrotune_proto::VERSION.into(),
            tracks_exits: launcher.tracks_exits(),
            max_restarts: config.cluster.max_restarts,
            restarts_done,
            resume_from: config
                .resume
                .as_ref()
                .map(|r| r.dir.to_string_lossy().into_owned()),
            earlier_checkpoints: match &config.resume {
                Some(r) => checkpoint::committed(&config.checkpoint_dir)
                    .into_iter()
                    .filter(|(step, dir)| *step < r.step && *dir != r.dir)
                    .map(|(_, dir)| dir.to_string_lossy().into_owned())
                    .collect(),
                None => Vec::new(),
            },
            grad_accum_steps: config.grad_accum_steps,
            min_workers: config.cluster.min_workers,
            devices: config.cluster.devices,
            gpu_need,
        },
        Instant::now(),
    );
    if restarts_done > 0 {
        progress.message(format!(
            "{restarts_done} of cluster.max_restarts = {} restarts were used by this job before",
            config.cluster.max_restarts
        ));
    }
    if let Err(e) = launcher.spawn(&plan, launcher_tx.clone()) {
        launcher.stop_all(STOP_GRACE).await;
        let _ = shutdown_tx.send(());
        return Err(e.into());
    }
    if launcher.tracks_exits() {
        tracing::info!(logs = %plan.log_dir.display(), "started {} workers", config.cluster.world_size);
    }
    observer.rendezvous();

    let mut pending: HashMap<String, oneshot::Sender<Reply>> = HashMap::new();
    // Per staged checkpoint: (training stall, write time) in seconds, until it is committed.
    let mut timings: HashMap<u64, (f64, f64)> = HashMap::new();
    let (commits_tx, mut commits) = mpsc::unbounded_channel::<CommitDone>();
    // The calls of the final checkpoint's parts, answered when it commits.
    let mut held: HashMap<u64, Vec<oneshot::Sender<Reply>>> = HashMap::new();
    let (resume_tx, mut resume_points) = mpsc::unbounded_channel::<Option<String>>();
    let mut tick = tokio::time::interval(TICK);
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let outcome = 'run: loop {
        let (event, mut reply) = tokio::select! {
            Some(inb) = inbound.recv() => (inb.event, Some(inb.reply)),
            Some(LauncherEvent::Exited { worker_id, success, code, status, last_line }) = launcher_events.recv() => {
                (Event::WorkerExited { worker_id, success, code, status, last_line }, None)
            }
            Some(path) = resume_points.recv() => (Event::ResumePointChosen { path }, None),
            Some(reason) = lease_lost.recv() => (Event::LeaseLost { reason }, None),
            Some(done) = commits.recv() => {
                let CommitDone { step, is_final, result, writers } = done;
                if let Ok(path) = &result {
                    let measured = timings.remove(&step);
                    observer.checkpoint(step, path, measured);
                    let timing = match measured {
                        Some((stall, write)) => format!(" (training held up {stall:.3} s; written in the background in {write:.2} s)"),
                        None => String::new(),
                    };
                    progress.message(format!("checkpoint step {step} committed: {}{timing}", path.display()));
                }
                let answer = result.as_ref().map(|p| p.to_string_lossy().into_owned());
                for w in writers {
                    let _ = w.send(Reply::Committed(answer.clone().map_err(Clone::clone)));
                }
                let event = match result {
                    Ok(path) => Event::CheckpointCommitted {
                        step,
                        path: path.to_string_lossy().into_owned(),
                        is_final,
                    },
                    Err(reason) => Event::CheckpointFailed { step, reason },
                };
                (event, None)
            }
            _ = tick.tick() => (Event::Tick, None),
            _ = tokio::signal::ctrl_c() => (Event::Interrupted, None),
            Some(_) = async { match sigterm.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                (Event::Interrupted, None)
            }
        };
        // A registration is answered at once (refused, or the one that completes the group) or
        // waits in `pending` for the Assign; a refused caller never displaces a waiting one.
        let registering = match &event {
            Event::Registered(info) => Some((info.worker_id.clone(), info.host.clone())),
            _ => None,
        };
        let is_registering = |id: &str| registering.as_ref().is_some_and(|(r, _)| r == id);
        let heartbeat_of = match &event {
            Event::Heartbeat {
                generation,
                rank,
                telemetry,
                ..
            } => {
                observer.heartbeat(*rank, telemetry);
                Some(*generation)
            }
            _ => None,
        };
        if let Event::CheckpointReady { step, timing, .. } = &event {
            timings.insert(*step, *timing);
        }
        let mut queue: Vec<Action> = job.handle(event, Instant::now());
        let mut finished = None;
        let mut last_rejection: Option<String> = None;
        while !queue.is_empty() {
            for action in std::mem::take(&mut queue) {
                match action {
                    Action::Assign(list) => {
                        let list_resume = list.first().and_then(|(_, a)| a.resume_from.clone());
                        let on = list.first().map(|(_, a)| {
                            let collective = match a.backend {
                                Backend::Ring => "the TCP ring",
                                Backend::Nccl => "NCCL",
                            };
                            format!("on {}, gradients reduced with {collective}", a.device.name())
                        });
                        for (worker_id, assignment) in list {
                            let r = if is_registering(&worker_id) {
                                reply.take()
                            } else {
                                pending.remove(&worker_id)
                            };
                            if let Some(r) = r {
                                let _ = r.send(Reply::Assigned(assignment));
                            }
                        }
                        let generation = job.generation();
                        let on = on.unwrap_or_default();
                        if generation == 1 {
                            tracing::info!(
                                "all {} workers registered; training starts {on}",
                                config.cluster.world_size
                            );
                        } else {
                            let from = list_resume_point(&list_resume);
                            progress.message(format!(
                                "generation {generation}: all {} workers are back; training continues from {from}",
                                config.cluster.world_size
                            ));
                        }
                        let mut roster = Vec::new();
                        for (rank, w) in job.roster() {
                            progress.message(format!(
                                "rank {rank}: worker {} on host {} (collective {})",
                                w.worker_id, w.host, w.peer_address
                            ));
                            roster.push((rank, w.worker_id.clone(), w.host.clone()));
                        }
                        observer.generation(generation, roster);
                    }
                    Action::Reject { worker_id, reason } => {
                        // A whole group refused for one reason is logged once.
                        if last_rejection.as_ref() != Some(&reason) {
                            tracing::warn!(%worker_id, "registration refused: {reason}");
                            last_rejection = Some(reason.clone());
                        }
                        let r = if is_registering(&worker_id) {
                            reply.take()
                        } else {
                            pending.remove(&worker_id)
                        };
                        if let Some(r) = r {
                            let _ = r.send(Reply::Rejected(reason));
                        }
                    }
                    Action::Refuse(reason) => {
                        if let Some(r) = reply.take() {
                            let _ = r.send(Reply::Rejected(reason));
                        }
                    }
                    Action::Discard { staging_dir } => {
                        let root = config.checkpoint_dir.clone();
                        tokio::task::spawn_blocking(move || {
                            checkpoint::discard_staging(&root, std::path::Path::new(&staging_dir))
                        });
                    }
                    Action::Restart {
                        generation,
                        restart,
                        max,
                        reason,
                        replace,
                    } => {
                        // Held calls of the ended generation's final checkpoint: dropping them
                        // tells those ranks it will not commit.
                        held.clear();
                        observer.restart(generation, restart, &reason);
                        progress.message(format!(
                            "restart {restart} of {max}: {reason}; generation {generation} forms{}",
                            if replace.is_empty() {
                                String::new()
                            } else {
                                format!(" (replacing {})", replace.join(", "))
                            }
                        ));
                        let dir = config.checkpoint_dir.clone();
                        // Small, but on shared storage: off the event loop.
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = restarts::write(&dir, restart) {
                                tracing::warn!("could not record the restart count: {e}");
                            }
                        });
                        if !replace.is_empty() {
                            if let Err(e) = launcher.replace(&plan, &replace, launcher_tx.clone()) {
                                queue.extend(job.handle(
                                    Event::LaunchFailed {
                                        reason: e.to_string(),
                                    },
                                    Instant::now(),
                                ));
                            }
                        }
                    }
                    Action::ChooseResumePoint {
                        candidates,
                        set_aside,
                    } => {
                        let answer = resume_tx.clone();
                        let root = config.checkpoint_dir.clone();
                        tokio::task::spawn_blocking(move || {
                            // What a lost writer staged is never committed (and no writer of
                            // the next generation has started: it is not formed yet).
                            if let Err(e) = checkpoint::remove_stale_staging(&root) {
                                tracing::warn!("could not clean staging directories: {e}");
                            }
                            let _ = answer.send(resume::choose_restart_point(
                                &candidates,
                                set_aside.as_ref(),
                            ));
                        });
                    }
                    Action::Shrink {
                        from,
                        to,
                        grad_accum_steps: (before, after),
                    } => progress.message(format!(
                        "continuing on {to} of {from} workers: the lost ones did not come back within cluster.rejoin_timeout_s; the global batch stays the same (gradient accumulation {before} -> {after}), so from here the run equals one on {to} workers"
                    )),
                    Action::Progress(m) => {
                        observer.step(&m);
                        progress.step(&m);
                    }
                    Action::Eval(m) => {
                        observer.eval(&m);
                        progress.eval(&m);
                    }
                    Action::Samples(phase, samples) => observer.samples(&phase, &samples),
                    Action::AcceptPart => {
                        if let Some(r) = reply.take() {
                            let _ = r.send(Reply::PartAccepted);
                        }
                    }
                    Action::HoldPart { step } => {
                        held.entry(step).or_default().extend(reply.take());
                    }
                    Action::Commit {
                        step,
                        staging_dir,
                        is_final,
                        files,
                        parts,
                    } => {
                        // File IO on shared storage (sizes, manifest, renames, retention): off
                        // the event loop, so that heartbeats keep being counted meanwhile. The
                        // writer's call is answered when the commit is done.
                        let mut writers = held.remove(&step).unwrap_or_default();
                        writers.extend(reply.take());
                        tasks::spawn_commit(
                            tasks::CommitOrder {
                                root: config.checkpoint_dir.clone(),
                                keep: config.checkpoint_keep,
                                step,
                                is_final,
                                main: (PathBuf::from(staging_dir), files),
                                parts: parts
                                    .into_iter()
                                    .map(|(dir, files)| (PathBuf::from(dir), files))
                                    .collect(),
                            },
                            lease.clone(),
                            writers,
                            commits_tx.clone(),
                        );
                    }
                    Action::StopWorkers { reason } => {
                        tracing::info!("stopping all workers: {reason}");
                        // Workers blocked in register learn that the job is over.
                        pending.clear();
                        launcher.stop_all(STOP_GRACE).await;
                    }
                    Action::Done(outcome) => finished = Some(outcome),
                }
            }
        }
        if let Some((id, host)) = &registering {
            if let (Some(r), None) = (reply.take(), &finished) {
                // A second registration under the same id replaces the first (dropping its
                // answer channel tells that caller the registration is void).
                pending.insert(id.clone(), r);
                progress.message(format!(
                    "registered: worker {id} on host {host} ({}/{})",
                    pending.len(),
                    config.cluster.world_size
                ));
            }
        } else if let Some(r) = reply.take() {
            let answer = match heartbeat_of {
                Some(generation) => Reply::Heartbeat(job.heartbeat_answer(generation)),
                None => Reply::Ack,
            };
            let _ = r.send(answer);
        }
        if let Some(outcome) = finished {
            break 'run outcome;
        }
    };
    progress.finish();
    health.set_service_status(COORDINATOR, NotServing).await;
    match &outcome {
        Outcome::Succeeded { final_checkpoint } => {
            observer.finished("succeeded", None, final_checkpoint.as_deref())
        }
        Outcome::Failed { reason } | Outcome::Refused { reason } => {
            observer.finished("failed", Some(reason.clone()), None)
        }
        Outcome::Interrupted => observer.finished("interrupted", None, None),
    }
    // Make sure nothing outlives the job, whatever the outcome.
    launcher.stop_all(STOP_GRACE).await;
    if !launcher.tracks_exits() {
        // Workers the coordinator cannot stop learn that the job is over from their next
        // heartbeat; stragglers are turned away rather than left dialling a closed port.
        let interval = config.cluster.heartbeat_interval;
        let to_tell = job.live_ranks(Instant::now()).into_iter().collect();
        drain(
            &mut inbound,
            to_tell,
            interval.min(DRAIN_MIN),
            interval * 2 + DRAIN_MIN,
        )
        .await;
    }
    renewal.abort();
    let _ = renewal.await;
    // The last reference (commits are all answered by now): dropping it releases the lease.
    let _ = tokio::task::spawn_blocking(move || drop(lease)).await;
    let _ = shutdown_tx.send(());
    // A graceful shutdown waits for every connection to close, and one to a host whose link is
    // gone never does: give it a moment, then drop the server.
    let abort = server.abort_handle();
    if tokio::time::timeout(SERVER_CLOSE, server).await.is_err() {
        abort.abort();
    }
    let _ = observe_stop.send(());
    let _ = std::fs::remove_file(&dashboard_file);
    Ok(JobReport {
        outcome,
        damaged: job.damaged_checkpoint().cloned(),
        eval_before: progress.eval_before,
        eval_after: progress.eval_after,
    })
}

/// "step-00000006" (the directory's name), or "the model" when a generation starts afresh.
fn list_resume_point(path: &Option<String>) -> String {
    match path {
        Some(p) => std::path::Path::new(p)
            .file_name()
            .map_or(p.clone(), |n| n.to_string_lossy().into_owned()),
        None => "the model (no checkpoint was committed yet)".into(),
    }
}
