//! The job's control logic as a pure state machine: `Job::handle(event, now) -> Vec<Action>`.
//!
//! No sockets, processes or files here: the driver feeds events in (from the gRPC service, the
//! launcher and a clock) and carries the actions out. That keeps every rule about rendezvous,
//! liveness and failure unit-testable, and leaves room for generations and restarts.

pub use crate::metrics::{EvalMetrics, StepMetrics, TaskEval};
use crate::natural::natural_cmp;
use ferrotune_data::manifest::FileDigest;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub host: String,
    pub local_index: u32,
    pub peer_address: String,
    /// The worker binary's version; must equal the coordinator's.
    pub version: String,
}

/// A worker's place in the current generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    pub local_world_size: u32,
    pub generation: u64,
    /// The collective address of rank (rank + 1) % world_size: the ring dials only its next
    /// neighbour (the previous one dials it), so this is all a worker needs.
    pub next_peer_address: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Registered(WorkerInfo),
    Heartbeat {
        rank: u32,
        generation: u64,
    },
    StepReported {
        rank: u32,
        metrics: StepMetrics,
    },
    EvalReported {
        rank: u32,
        metrics: EvalMetrics,
    },
    CheckpointReady {
        rank: u32,
        step: u64,
        staging_dir: String,
        is_final: bool,
        files: Vec<FileDigest>,
        /// Training stall and background write time (for the log; the job ignores them).
        timing: (f64, f64),
    },
    CheckpointCommitted {
        step: u64,
        path: String,
        is_final: bool,
    },
    CheckpointFailed {
        step: u64,
        reason: String,
    },
    Finished {
        rank: u32,
        ok: bool,
        error: String,
        /// A file of the resumed checkpoint that did not match its manifest (the driver sets
        /// that checkpoint aside).
        damaged_file: Option<String>,
    },
    /// A worker process ended (reported by the launcher).
    WorkerExited {
        worker_id: String,
        success: bool,
        status: String,
        last_line: Option<String>,
    },
    /// The launcher could not start or keep a worker.
    LaunchFailed {
        reason: String,
    },
    /// Another coordinator took over the checkpoint directory's lease.
    LeaseLost {
        reason: String,
    },
    /// The user asked to stop (Ctrl-C, SIGTERM).
    Interrupted,
    /// Time passes; deadlines are checked.
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer every pending registration: the group is complete.
    Assign(Vec<(String, Assignment)>),
    /// Refuse one registration.
    Reject {
        worker_id: String,
        reason: String,
    },
    Progress(StepMetrics),
    Eval(EvalMetrics),
    /// Every writing rank has staged this checkpoint: write the manifest and rename it in place.
    Commit {
        step: u64,
        staging_dir: String,
        is_final: bool,
        files: Vec<FileDigest>,
    },
    /// Stop all workers (failure or interruption) and wait until every process is gone.
    StopWorkers {
        reason: String,
    },
    /// The job is over; the driver exits with this outcome.
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded { final_checkpoint: Option<String> },
    Failed { reason: String },
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rendezvous,
    Running,
    Done,
}

#[derive(Debug)]
struct Member {
    info: WorkerInfo,
    rank: Option<u32>,
    last_seen: Instant,
    finished: bool,
    reported_failure: bool,
    exited: bool,
}

impl Member {
    /// "rank 1 (worker w1 on host n2)": what a failure message names, so that an operator can
    /// find the machine.
    fn describe(&self) -> String {
        let where_ = format!("worker {} on host {}", self.info.worker_id, self.info.host);
        match self.rank {
            Some(r) => format!("rank {r} ({where_})"),
            None => format!("{where_} (no rank yet)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobParams {
    pub world_size: u32,
    pub heartbeat_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// How long to gather failure reports before deciding which one is the cause.
    pub failure_grace: Duration,
    /// The version every worker must report (the coordinator's own).
    pub version: String,
    /// Whether the launcher owns the worker processes and reports their exits (local, Slurm).
    /// Then success also waits for every process to end; with external workers it cannot.
    pub tracks_exits: bool,
}

/// One failure report. When a worker dies its ring neighbours fail a moment later ("peer
/// closed the connection"); collecting reports briefly lets the job blame the root cause.
#[derive(Debug, Clone)]
struct Failure {
    /// 2: the process died or exited without reporting; 1: the worker reported an error.
    severity: u8,
    at: Instant,
    reason: String,
}

#[derive(Debug)]
pub struct Job {
    params: JobParams,
    phase: Phase,
    generation: u64,
    started: Instant,
    /// Keyed by worker_id.
    members: BTreeMap<String, Member>,
    /// worker_id by rank, once ranks are assigned: heartbeats from thousands of workers find
    /// their member without a scan.
    by_rank: Vec<String>,
    final_checkpoint: Option<String>,
    failures: Vec<Failure>,
}

impl Job {
    pub fn new(params: JobParams, now: Instant) -> Self {
        Job {
            params,
            phase: Phase::Rendezvous,
            generation: 1,
            started: now,
            members: BTreeMap::new(),
            by_rank: Vec::new(),
            final_checkpoint: None,
            failures: Vec::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn rank_of(&self, worker_id: &str) -> Option<u32> {
        self.members.get(worker_id).and_then(|m| m.rank)
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether workers should keep going (heartbeat answer).
    pub fn should_continue(&self) -> bool {
        matches!(self.phase, Phase::Rendezvous | Phase::Running)
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        match event {
            Event::Registered(info) => self.on_register(info, now),
            Event::Heartbeat { rank, generation } => {
                if generation == self.generation {
                    if let Some(m) = self.member_by_rank_mut(rank) {
                        m.last_seen = now;
                    }
                }
                Vec::new()
            }
            Event::StepReported { rank, metrics } => {
                self.touch(rank, now);
                vec![Action::Progress(metrics)]
            }
            Event::EvalReported { rank, metrics } => {
                self.touch(rank, now);
                vec![Action::Eval(metrics)]
            }
            Event::CheckpointReady {
                rank,
                step,
                staging_dir,
                is_final,
                files,
                ..
            } => {
                self.touch(rank, now);
                // Data parallel: rank 0 holds the full state and is the only writer. With sharded
                // optimizer state every rank will write its part and this waits for all of them.
                if rank == 0 && self.phase == Phase::Running {
                    vec![Action::Commit {
                        step,
                        staging_dir,
                        is_final,
                        files,
                    }]
                } else {
                    Vec::new()
                }
            }
            Event::CheckpointCommitted { path, is_final, .. } => {
                if is_final {
                    self.final_checkpoint = Some(path);
                }
                Vec::new()
            }
            Event::CheckpointFailed { step, reason } => self.fail(format!(
                "checkpoint of step {step} could not be committed: {reason}"
            )),
            Event::Finished {
                rank, ok, error, ..
            } => {
                if let Some(m) = self.member_by_rank_mut(rank) {
                    m.finished = ok;
                    m.reported_failure = !ok;
                }
                if !ok {
                    let who = self
                        .member_by_rank_mut(rank)
                        .map_or(format!("rank {rank}"), |m| m.describe());
                    self.record_failure(1, format!("{who} failed: {error}"), now);
                    return self.decide_failure(now);
                }
                self.check_complete()
            }
            Event::WorkerExited {
                worker_id,
                success,
                status,
                last_line,
            } => self.on_exit(&worker_id, success, status, last_line, now),
            Event::LaunchFailed { reason } => self.fail(format!("launcher: {reason}")),
            Event::LeaseLost { reason } => self.fail(format!("{reason}; this coordinator stops")),
            Event::Interrupted => self.stop(Outcome::Interrupted, "interrupted by the user".into()),
            Event::Tick => self.on_tick(now),
        }
    }

    fn on_register(&mut self, info: WorkerInfo, now: Instant) -> Vec<Action> {
        // Checked before anything else: a stranger must not take a place in the group.
        if info.version != self.params.version {
            return vec![Action::Reject {
                worker_id: info.worker_id,
                reason: format!(
                    "worker version {} does not match coordinator version {}: run the same ferrotune release on every host",
                    if info.version.is_empty() { "(none)" } else { &info.version },
                    self.params.version
                ),
            }];
        }
        if self.phase != Phase::Rendezvous {
            return vec![Action::Reject {
                worker_id: info.worker_id,
                reason: "the job is not accepting registrations (rendezvous is over)".into(),
            }];
        }
        if self.members.len() as u32 >= self.params.world_size
            && !self.members.contains_key(&info.worker_id)
        {
            return vec![Action::Reject {
                worker_id: info.worker_id,
                reason: format!("the job already has its {} workers", self.params.world_size),
            }];
        }
        let id = info.worker_id.clone();
        self.members.insert(
            id,
            Member {
                info,
                rank: None,
                last_seen: now,
                finished: false,
                reported_failure: false,
                exited: false,
            },
        );
        if self.members.len() as u32 == self.params.world_size {
            self.phase = Phase::Running;
            vec![Action::Assign(self.assign_ranks(now))]
        } else {
            Vec::new()
        }
    }

    /// Stable ranks: ordered by host (numbers in names by value: n2 before n10, pod-2 before
    /// pod-10), then by the launcher's local index, then worker id.
    fn assign_ranks(&mut self, now: Instant) -> Vec<(String, Assignment)> {
        let mut order: Vec<&Member> = self.members.values().collect();
        order.sort_by(|a, b| {
            natural_cmp(&a.info.host, &b.info.host)
                .then(a.info.local_index.cmp(&b.info.local_index))
                .then(a.info.worker_id.cmp(&b.info.worker_id))
        });
        let ids: Vec<String> = order.iter().map(|m| m.info.worker_id.clone()).collect();
        self.by_rank = ids.clone();
        let peers: Vec<String> = order.iter().map(|m| m.info.peer_address.clone()).collect();
        let mut per_host: BTreeMap<String, u32> = BTreeMap::new();
        let mut local_ranks = Vec::new();
        for m in &order {
            let n = per_host.entry(m.info.host.clone()).or_default();
            local_ranks.push(*n);
            *n += 1;
        }
        let mut out = Vec::new();
        for (rank, id) in ids.iter().enumerate() {
            let member = self.members.get_mut(id).expect("member listed above");
            member.rank = Some(rank as u32);
            member.last_seen = now;
            out.push((
                id.clone(),
                Assignment {
                    rank: rank as u32,
                    world_size: self.params.world_size,
                    local_rank: local_ranks[rank],
                    local_world_size: per_host[&member.info.host],
                    generation: self.generation,
                    next_peer_address: peers[(rank + 1) % peers.len()].clone(),
                },
            ));
        }
        out
    }

    fn on_exit(
        &mut self,
        worker_id: &str,
        success: bool,
        status: String,
        last_line: Option<String>,
        now: Instant,
    ) -> Vec<Action> {
        let (finished, reported) = match self.members.get_mut(worker_id) {
            Some(m) => {
                m.exited = true;
                (m.finished, m.reported_failure)
            }
            None => (false, false),
        };
        if success && finished {
            return self.check_complete();
        }
        if reported {
            // Its own report already explains this exit.
            return self.decide_failure(now);
        }
        let who = match self.members.get(worker_id) {
            Some(m) => m.describe(),
            None => format!("worker {worker_id} (not registered)"),
        };
        let why = if success {
            "exited before finishing".to_string()
        } else {
            status
        };
        let mut reason = format!("{who} {why}");
        if let Some(line) = last_line {
            reason.push_str(&format!("; its last log line: {line}"));
        }
        self.record_failure(2, reason, now);
        self.decide_failure(now)
    }

    fn record_failure(&mut self, severity: u8, reason: String, now: Instant) {
        self.failures.push(Failure {
            severity,
            at: now,
            reason,
        });
    }

    /// Fails the job once the grace period after the first report has passed, blaming the most
    /// severe (then earliest) report. Before that, waits for more reports.
    fn decide_failure(&mut self, now: Instant) -> Vec<Action> {
        let Some(first) = self.failures.iter().map(|f| f.at).min() else {
            return Vec::new();
        };
        let everyone_gone = !self.members.is_empty() && self.members.values().all(|m| m.exited);
        if now.duration_since(first) < self.params.failure_grace && !everyone_gone {
            return Vec::new();
        }
        let cause = self
            .failures
            .iter()
            .max_by(|a, b| a.severity.cmp(&b.severity).then(b.at.cmp(&a.at)))
            .expect("at least one failure")
            .clone();
        let others = self.failures.len() - 1;
        let mut reason = cause.reason;
        if others > 0 {
            reason.push_str(&format!(" ({others} other failure report(s) followed)"));
        }
        self.fail(reason)
    }

    fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        if !self.failures.is_empty() {
            return self.decide_failure(now);
        }
        match self.phase {
            Phase::Rendezvous => {
                if now.duration_since(self.started) > self.params.rendezvous_timeout {
                    let reason = format!(
                        "only {} of {} workers registered within {:?}",
                        self.members.len(),
                        self.params.world_size,
                        self.params.rendezvous_timeout
                    );
                    return self.fail(reason);
                }
                Vec::new()
            }
            Phase::Running => {
                let late = self.members.values().find(|m| {
                    !m.finished && now.duration_since(m.last_seen) > self.params.heartbeat_timeout
                });
                if let Some(m) = late {
                    let reason = format!(
                        "{} sent no heartbeat for {:?} (lost, partitioned or frozen)",
                        m.describe(),
                        self.params.heartbeat_timeout
                    );
                    return self.fail(reason);
                }
                Vec::new()
            }
            Phase::Done => Vec::new(),
        }
    }

    fn fail(&mut self, reason: String) -> Vec<Action> {
        self.stop(
            Outcome::Failed {
                reason: reason.clone(),
            },
            reason,
        )
    }

    /// Ends the job. The driver carries out `StopWorkers` before `Done`, and the launcher's stop
    /// returns only once every worker process is gone, so nothing outlives the job.
    fn stop(&mut self, outcome: Outcome, reason: String) -> Vec<Action> {
        self.phase = Phase::Done;
        vec![Action::StopWorkers { reason }, Action::Done(outcome)]
    }

    fn check_complete(&mut self) -> Vec<Action> {
        let tracks_exits = self.params.tracks_exits;
        let all = self.members.len() as u32 == self.params.world_size
            && self
                .members
                .values()
                .all(|m| m.finished && (m.exited || !tracks_exits));
        if self.phase == Phase::Running && all {
            self.phase = Phase::Done;
            vec![Action::Done(Outcome::Succeeded {
                final_checkpoint: self.final_checkpoint.clone(),
            })]
        } else {
            Vec::new()
        }
    }

    fn touch(&mut self, rank: u32, now: Instant) {
        if let Some(m) = self.member_by_rank_mut(rank) {
            m.last_seen = now;
        }
    }

    /// Ranks that may still be running and listening: not finished, not gone, heard from within
    /// the heartbeat timeout. After a failure these are the ones to tell that the job is over.
    pub fn live_ranks(&self, now: Instant) -> Vec<u32> {
        self.members
            .values()
            .filter(|m| {
                !m.finished
                    && !m.reported_failure
                    && !m.exited
                    && now.duration_since(m.last_seen) <= self.params.heartbeat_timeout
            })
            .filter_map(|m| m.rank)
            .collect()
    }

    /// Workers by rank once ranks are assigned: (rank, identity).
    pub fn roster(&self) -> Vec<(u32, &WorkerInfo)> {
        let mut out: Vec<_> = self
            .members
            .values()
            .filter_map(|m| m.rank.map(|r| (r, &m.info)))
            .collect();
        out.sort_by_key(|(r, _)| *r);
        out
    }

    fn member_by_rank_mut(&mut self, rank: u32) -> Option<&mut Member> {
        let id = self.by_rank.get(rank as usize)?;
        self.members.get_mut(id)
    }
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
