//! The job's control logic as a pure state machine: `Job::handle(event, now) -> Vec<Action>`.
//!
//! No sockets, processes or files here: the driver feeds events in (from the gRPC service, the
//! launcher and a clock) and carries the actions out. That keeps every rule about rendezvous,
//! liveness, failure and restarts unit-testable.
//!
//! A job runs in generations. Generation 1 is the first rendezvous; a failure that may pass
//! (a lost worker, a broken ring) ends the generation: survivors are told to rejoin, lost
//! workers are replaced by the launcher, and generation g+1 starts from the newest intact
//! checkpoint once everyone has registered again (`failure.rs`).

pub mod devices;
mod events;
mod failure;
mod parts;

pub use crate::metrics::{EvalMetrics, Sample, StepMetrics, TaskEval};
use crate::natural::natural_cmp;
pub use events::{
    Action, Assignment, Event, HeartbeatAnswer, Outcome, Telemetry, WorkerInfo, WorkerPhase,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
    phase: WorkerPhase,
    finished: bool,
    reported_failure: bool,
    exited: bool,
    /// Already recorded as lost (no heartbeat): not recorded again at every tick.
    lost: bool,
}

impl Member {
    fn new(info: WorkerInfo, now: Instant) -> Member {
        Member {
            info,
            rank: None,
            last_seen: now,
            phase: WorkerPhase::Loading,
            finished: false,
            reported_failure: false,
            exited: false,
            lost: false,
        }
    }

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
    /// How long a re-formed group waits for its workers to register again.
    pub rejoin_timeout: Duration,
    /// How long every worker may train without a step report (a hang inside a collective).
    pub step_timeout: Duration,
    /// How long to gather failure reports before deciding which one is the cause.
    pub failure_grace: Duration,
    /// The version every worker must report (the coordinator's own).
    pub version: String,
    /// Whether the launcher owns the worker processes and reports their exits (local, Slurm).
    /// Then success also waits for every process to end; with external workers it cannot.
    pub tracks_exits: bool,
    /// Restarts allowed for the whole job, and those already spent by earlier coordinators.
    pub max_restarts: u32,
    pub restarts_done: u32,
    /// The committed checkpoint generation 1 starts from; None: the model.
    pub resume_from: Option<String>,
    /// Earlier checkpoints of the same run (oldest first), for a restart to fall back to when
    /// `resume_from` turns out damaged.
    pub earlier_checkpoints: Vec<String>,
    /// Gradient accumulation at the full world size: with it, the global batch that a smaller
    /// group must keep.
    pub grad_accum_steps: u32,
    /// The fewest workers the job may continue on when lost ones do not come back.
    pub min_workers: u32,
    pub devices: crate::config::DeviceConfig,
    /// Per-GPU memory the job needs (None: not checked), against what workers report.
    pub gpu_need: Option<devices::GpuNeed>,
}

#[derive(Debug)]
pub struct Job {
    params: JobParams,
    /// Workers per generation: `params.world_size` unless the job had to shrink.
    world_size: u32,
    grad_accum_steps: u32,
    phase: Phase,
    generation: u64,
    /// When the current rendezvous began (its deadline counts from here).
    rendezvous_started: Instant,
    /// Keyed by worker_id.
    members: BTreeMap<String, Member>,
    /// worker_id by rank, once ranks are assigned: heartbeats from thousands of workers find
    /// their member without a scan.
    by_rank: Vec<String>,
    /// Registrations of a new process for a running member: held for the next generation.
    early: Vec<WorkerInfo>,
    /// The workers of the generation that ended, for the message when they do not come back.
    previous: Vec<String>,
    /// Workers whose process ended (registered or not): replaced at the next restart.
    gone: Vec<String>,
    final_checkpoint: Option<String>,
    failures: Vec<failure::Failure>,
    restarts: u32,
    /// Checkpoints this job may restart from, oldest first.
    committed: Vec<String>,
    /// What the next (or current) generation starts from.
    resume_from: Option<String>,
    /// A checkpoint found damaged (its path, the file), set aside at the next restart.
    damaged: Option<(String, String)>,
    /// Commits handed to the driver and not yet answered: a restart chooses its checkpoint
    /// only once they have landed.
    commits_in_flight: u32,
    /// Parts of checkpoints staged by some ranks of the current generation, not all yet.
    parts: parts::Parts,
    /// A restart waits for its resume point: Some(set_aside) until it is asked for, then
    /// `resume_point_asked` until the answer comes.
    resume_point_wanted: Option<Option<(String, String)>>,
    resume_point_asked: bool,
    /// Last sign of progress (a step, an eval, a checkpoint, a phase other than training).
    last_progress: Instant,
}

impl Job {
    pub fn new(params: JobParams, now: Instant) -> Self {
        let mut committed = params.earlier_checkpoints.clone();
        committed.extend(params.resume_from.iter().cloned());
        Job {
            world_size: params.world_size,
            grad_accum_steps: params.grad_accum_steps,
            phase: Phase::Rendezvous,
            generation: 1,
            rendezvous_started: now,
            members: BTreeMap::new(),
            by_rank: Vec::new(),
            early: Vec::new(),
            previous: Vec::new(),
            gone: Vec::new(),
            final_checkpoint: None,
            failures: Vec::new(),
            restarts: params.restarts_done,
            resume_from: params.resume_from.clone(),
            committed,
            damaged: None,
            commits_in_flight: 0,
            parts: parts::Parts::default(),
            resume_point_wanted: None,
            resume_point_asked: false,
            last_progress: now,
            params,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Restarts spent so far, by this coordinator and the ones before it.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// A checkpoint a worker found damaged (its directory, the file) that no restart has set
    /// aside yet: the job ended before one could.
    pub fn damaged_checkpoint(&self) -> Option<&(String, String)> {
        self.damaged.as_ref()
    }

    pub fn rank_of(&self, worker_id: &str) -> Option<u32> {
        self.members.get(worker_id).and_then(|m| m.rank)
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// How to answer a heartbeat of `generation`.
    pub fn heartbeat_answer(&self, generation: u64) -> HeartbeatAnswer {
        match self.phase {
            Phase::Done => HeartbeatAnswer::Stop("the job is stopping".into()),
            _ if generation < self.generation => HeartbeatAnswer::Rejoin,
            _ => HeartbeatAnswer::Continue,
        }
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        // Reports of a generation that has ended are ignored (a step, an eval) or refused (a
        // checkpoint: the state it holds may be ahead of what the next generation resumes from,
        // and it must not become the newest checkpoint behind the restart's back).
        let current =
            |generation: u64| generation == self.generation && self.phase == Phase::Running;
        match event {
            Event::Registered(info) => self.on_register(info, now),
            Event::Heartbeat {
                rank,
                generation,
                phase,
                ..
            } => {
                if current(generation) {
                    if phase != WorkerPhase::Training {
                        self.last_progress = now;
                    }
                    if let Some(m) = self.member_by_rank_mut(rank) {
                        m.last_seen = now;
                        m.phase = phase;
                    }
                }
                Vec::new()
            }
            Event::StepReported {
                rank,
                generation,
                metrics,
            } => self.on_progress(rank, generation, Action::Progress(metrics), now),
            Event::EvalReported {
                rank,
                generation,
                metrics,
            } => self.on_progress(rank, generation, Action::Eval(metrics), now),
            Event::SamplesReported {
                rank,
                generation,
                phase,
                samples,
            } => self.on_progress(rank, generation, Action::Samples(phase, samples), now),
            Event::CheckpointReady {
                rank,
                generation,
                step,
                staging_dir,
                is_final,
                files,
                parts,
                ..
            } => {
                if !current(generation) || !self.failures.is_empty() {
                    return vec![
                        Action::Refuse(format!(
                            "checkpoint of step {step} not committed: generation {generation} has ended (a worker was lost); the group restarts from the newest committed checkpoint"
                        )),
                        Action::Discard { staging_dir },
                    ];
                }
                self.touch(rank, now);
                self.last_progress = now;
                let part = parts::Part {
                    rank,
                    staging_dir,
                    files,
                };
                self.on_checkpoint_part(step, is_final, parts, part)
            }
            Event::CheckpointCommitted { path, is_final, .. } => {
                self.commits_in_flight = self.commits_in_flight.saturating_sub(1);
                if is_final {
                    self.final_checkpoint = Some(path.clone());
                }
                self.committed.push(path);
                self.ask_resume_point()
            }
            Event::CheckpointFailed { step, reason } => {
                self.commits_in_flight = self.commits_in_flight.saturating_sub(1);
                self.fail(format!(
                    "checkpoint of step {step} could not be committed: {reason}"
                ))
            }
            Event::Finished {
                rank,
                generation,
                ok,
                error,
                retriable,
                damaged_file,
            } => {
                if !current(generation) {
                    return Vec::new();
                }
                self.on_finished(rank, ok, error, retriable, damaged_file, now)
            }
            Event::WorkerExited {
                worker_id,
                success,
                code,
                status,
                last_line,
            } => self.on_exit(&worker_id, success, code, status, last_line, now),
            Event::ResumePointChosen { path } => {
                self.resume_point_asked = false;
                self.resume_from = path;
                self.maybe_assign(now)
            }
            Event::LaunchFailed { reason } => self.fail(format!("launcher: {reason}")),
            Event::LeaseLost { reason } => self.fail(format!("{reason}; this coordinator stops")),
            Event::Interrupted => self.stop(Outcome::Interrupted, "interrupted by the user".into()),
            Event::Tick => self.on_tick(now),
        }
    }

    /// A step or eval report: passed on (and counted as progress) if it is of this generation.
    fn on_progress(
        &mut self,
        rank: u32,
        generation: u64,
        report: Action,
        now: Instant,
    ) -> Vec<Action> {
        if generation != self.generation || self.phase != Phase::Running {
            return Vec::new();
        }
        self.touch(rank, now);
        self.last_progress = now;
        vec![report]
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
        if self.phase == Phase::Running {
            // A new process under a running member's identity (a restarted pod, a respawned
            // task): the old one is gone. The registration waits for the next generation.
            if let Some(m) = self.members.get_mut(&info.worker_id) {
                if !m.finished && !m.exited {
                    m.exited = true;
                    let reason = format!(
                        "{} registered again: its previous process is gone",
                        m.describe()
                    );
                    self.early.retain(|e| e.worker_id != info.worker_id);
                    self.early.push(info);
                    self.record_failure(2, true, reason, now);
                    return self.decide_failure(now);
                }
            }
            return vec![Action::Reject {
                worker_id: info.worker_id,
                reason: "the job is not accepting registrations (rendezvous is over)".into(),
            }];
        }
        if self.members.len() as u32 >= self.world_size
            && !self.members.contains_key(&info.worker_id)
        {
            return vec![Action::Reject {
                worker_id: info.worker_id,
                reason: format!("the job already has its {} workers", self.world_size),
            }];
        }
        self.members
            .insert(info.worker_id.clone(), Member::new(info, now));
        self.maybe_assign(now)
    }

    /// Starts the generation once every worker has registered, no failure is being decided and
    /// the checkpoint to start from is known.
    fn maybe_assign(&mut self, now: Instant) -> Vec<Action> {
        let ready = self.phase == Phase::Rendezvous
            && self.failures.is_empty()
            && self.resume_point_wanted.is_none()
            && !self.resume_point_asked
            && self.members.len() as u32 == self.world_size;
        if !ready {
            return Vec::new();
        }
        let order = self.rank_order();
        let infos: Vec<&WorkerInfo> = order.iter().map(|id| &self.members[id].info).collect();
        let resolved = match devices::resolve_fitting(&self.params, &infos) {
            Ok(r) => r,
            Err(reason) => return self.refuse_group(reason),
        };
        self.phase = Phase::Running;
        self.last_progress = now;
        vec![Action::Assign(self.assign_ranks(order, &resolved, now))]
    }

    /// The group cannot run as configured: every waiting worker is told why, and the job ends.
    fn refuse_group(&mut self, reason: String) -> Vec<Action> {
        let mut actions: Vec<Action> = self
            .members
            .keys()
            .map(|id| Action::Reject {
                worker_id: id.clone(),
                reason: reason.clone(),
            })
            .collect();
        self.phase = Phase::Done;
        actions.push(Action::StopWorkers {
            reason: reason.clone(),
        });
        actions.push(Action::Done(Outcome::Refused { reason }));
        actions
    }

    /// Stable ranks: ordered by host (numbers in names by value: n2 before n10, pod-2 before
    /// pod-10), then by the launcher's local index, then worker id. A replacement with the same
    /// identity gets the lost worker's rank.
    fn rank_order(&self) -> Vec<String> {
        let mut order: Vec<&Member> = self.members.values().collect();
        order.sort_by(|a, b| {
            natural_cmp(&a.info.host, &b.info.host)
                .then(a.info.local_index.cmp(&b.info.local_index))
                .then(a.info.worker_id.cmp(&b.info.worker_id))
        });
        order.iter().map(|m| m.info.worker_id.clone()).collect()
    }

    fn assign_ranks(
        &mut self,
        ids: Vec<String>,
        resolved: &devices::Resolved,
        now: Instant,
    ) -> Vec<(String, Assignment)> {
        let order: Vec<&Member> = ids.iter().map(|id| &self.members[id]).collect();
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
                    world_size: self.world_size,
                    local_rank: local_ranks[rank],
                    local_world_size: per_host[&member.info.host],
                    generation: self.generation,
                    next_peer_address: peers[(rank + 1) % peers.len()].clone(),
                    resume_from: self.resume_from.clone(),
                    grad_accum_steps: self.grad_accum_steps,
                    device: resolved.device,
                    backend: resolved.backend,
                    nccl_id: resolved.nccl_id.clone(),
                },
            ));
        }
        out
    }

    fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        if !self.failures.is_empty() {
            return self.decide_failure(now);
        }
        match self.phase {
            Phase::Rendezvous => {
                let (limit, what) = if self.generation == 1 {
                    (self.params.rendezvous_timeout, "registered")
                } else {
                    (self.params.rejoin_timeout, "registered again")
                };
                if now.duration_since(self.rendezvous_started) > limit {
                    if self.generation > 1 {
                        if let Some(actions) = self.shrink(now) {
                            return actions;
                        }
                    }
                    let mut reason = format!(
                        "only {} of {} workers {what} within {limit:?}",
                        self.members.len(),
                        self.world_size,
                    );
                    let missing: Vec<&str> = self
                        .previous
                        .iter()
                        .filter(|id| !self.members.contains_key(*id))
                        .map(String::as_str)
                        .collect();
                    if !missing.is_empty() {
                        reason.push_str(&format!("; missing: {}", missing.join(", ")));
                    }
                    return self.fail(reason);
                }
                Vec::new()
            }
            Phase::Running => self.check_liveness(now),
            Phase::Done => Vec::new(),
        }
    }

    /// Ends the job. The driver carries out `StopWorkers` before `Done`, and the launcher's stop
    /// returns only once every worker process is gone, so nothing outlives the job.
    fn stop(&mut self, outcome: Outcome, reason: String) -> Vec<Action> {
        self.phase = Phase::Done;
        let mut actions = self.discard_parts();
        actions.extend([Action::StopWorkers { reason }, Action::Done(outcome)]);
        actions
    }

    fn fail(&mut self, reason: String) -> Vec<Action> {
        self.stop(
            Outcome::Failed {
                reason: reason.clone(),
            },
            reason,
        )
    }

    fn check_complete(&mut self) -> Vec<Action> {
        let tracks_exits = self.params.tracks_exits;
        let all = self.members.len() as u32 == self.world_size
            && self
                .members
                .values()
                .all(|m| m.finished && (m.exited || !tracks_exits));
        if self.phase == Phase::Running && self.failures.is_empty() && all {
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
mod tests;

#[cfg(test)]
mod restart_tests;
