//! Failures and restarts: what counts as a failure (an exit, a report, silence, no progress),
//! which report is the cause, and whether the job ends or re-forms its group.

use super::{Action, Job, Member, Outcome, Phase};
use std::time::Instant;

/// The exit code with which a worker says its error is permanent (configuration, data): a new
/// generation would meet it again.
pub const PERMANENT_EXIT: i32 = 2;

/// One failure report. When a worker dies its ring neighbours fail a moment later ("peer
/// closed the connection"); collecting reports briefly lets the job blame the root cause.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    /// 2: the process died, exited without reporting or went silent; 1: it reported an error.
    severity: u8,
    /// Whether re-forming the group may get past it.
    retriable: bool,
    at: Instant,
    reason: String,
}

impl Job {
    pub(super) fn record_failure(
        &mut self,
        severity: u8,
        retriable: bool,
        reason: String,
        now: Instant,
    ) {
        self.failures.push(Failure {
            severity,
            retriable,
            at: now,
            reason,
        });
    }

    pub(super) fn on_finished(
        &mut self,
        rank: u32,
        ok: bool,
        error: String,
        retriable: bool,
        damaged_file: Option<String>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(m) = self.member_by_rank_mut(rank) else {
            return Vec::new();
        };
        m.finished = ok;
        m.reported_failure = !ok;
        if ok {
            return self.check_complete();
        }
        let who = m.describe();
        let retriable = match (damaged_file, &self.resume_from) {
            // The next generation starts from the checkpoint before the damaged one.
            (Some(file), Some(dir)) => {
                self.damaged = Some((dir.clone(), file));
                true
            }
            _ => retriable,
        };
        self.record_failure(1, retriable, format!("{who} failed: {error}"), now);
        self.decide_failure(now)
    }

    pub(super) fn on_exit(
        &mut self,
        worker_id: &str,
        success: bool,
        code: Option<i32>,
        status: String,
        last_line: Option<String>,
        now: Instant,
    ) -> Vec<Action> {
        let finished_ok = success && self.members.get(worker_id).is_some_and(|m| m.finished);
        if !finished_ok && !self.gone.iter().any(|g| g == worker_id) {
            self.gone.push(worker_id.to_string());
        }
        let Some(m) = self.members.get_mut(worker_id) else {
            // Not registered (in this generation): it could not start, or it was a survivor
            // that died before registering again. A restart replaces it.
            let when = if self.generation > 1 {
                "before rejoining"
            } else {
                "before registering"
            };
            let mut reason = format!("worker {worker_id} {status} {when}");
            if let Some(line) = last_line {
                reason.push_str(&format!("; its last log line: {line}"));
            }
            self.record_failure(2, code != Some(PERMANENT_EXIT), reason, now);
            return self.decide_failure(now);
        };
        m.exited = true;
        if success && m.finished {
            return self.check_complete();
        }
        if m.reported_failure {
            // Its own report already explains this exit.
            return self.decide_failure(now);
        }
        let why = if success {
            "exited before finishing".to_string()
        } else {
            status
        };
        let mut reason = format!("{} {why}", m.describe());
        if let Some(line) = last_line {
            reason.push_str(&format!("; its last log line: {line}"));
        }
        self.record_failure(2, code != Some(PERMANENT_EXIT), reason, now);
        self.decide_failure(now)
    }

    /// Silence (no heartbeat within the timeout: lost, partitioned, frozen) and a group that
    /// trains without reporting a step for `step_timeout` (a hang inside a collective).
    pub(super) fn check_liveness(&mut self, now: Instant) -> Vec<Action> {
        let timeout = self.params.heartbeat_timeout;
        let mut silent = Vec::new();
        for m in self.members.values_mut() {
            if !m.finished && !m.exited && !m.lost && now.duration_since(m.last_seen) > timeout {
                m.lost = true;
                silent.push(format!(
                    "{} sent no heartbeat for {timeout:?} (lost, partitioned or frozen)",
                    m.describe()
                ));
            }
        }
        for reason in silent {
            self.record_failure(2, true, reason, now);
        }
        let training = self
            .members
            .values()
            .any(|m| !m.finished && m.phase == super::WorkerPhase::Training);
        let stalled = now.duration_since(self.last_progress);
        if self.failures.is_empty() && training && stalled > self.params.step_timeout {
            let reason = format!(
                "no step was reported for {stalled:.0?} while the workers train (cluster.step_timeout_s is {:?}): a collective or a worker hangs",
                self.params.step_timeout
            );
            self.record_failure(1, true, reason, now);
        }
        self.decide_failure(now)
    }

    /// Once the cause is known (a death or silence, every worker gone, or the grace period
    /// after the first report passed), blames the most severe (then earliest) report, then
    /// restarts or fails the job.
    pub(super) fn decide_failure(&mut self, now: Instant) -> Vec<Action> {
        let Some(first) = self.failures.iter().map(|f| f.at).min() else {
            return Vec::new();
        };
        let everyone_gone = !self.members.is_empty() && self.members.values().all(|m| m.exited);
        // A process that died (or went silent) is the root cause whatever else is reported:
        // no need to wait for more. A worker's own report ("lost the connection to rank 1")
        // is often the echo of such a death, so it waits the grace period for one.
        let root_cause_known = self.failures.iter().any(|f| f.severity == 2);
        if now.duration_since(first) < self.params.failure_grace
            && !everyone_gone
            && !root_cause_known
        {
            return Vec::new();
        }
        let cause = self
            .failures
            .iter()
            .max_by(|a, b| a.severity.cmp(&b.severity).then(b.at.cmp(&a.at)))
            .expect("at least one failure")
            .clone();
        let others = self.failures.len() - 1;
        let retriable = self.failures.iter().all(|f| f.retriable);
        self.failures.clear();
        let mut reason = cause.reason;
        if others > 0 {
            reason.push_str(&format!(" ({others} other failure report(s) followed)"));
        }
        if let Some(path) = &self.final_checkpoint {
            // The result is complete and committed: a worker lost afterwards changes nothing.
            let final_checkpoint = Some(path.clone());
            return self.stop(
                Outcome::Succeeded { final_checkpoint },
                format!("after the final checkpoint: {reason}"),
            );
        }
        if !retriable {
            return self.fail(reason);
        }
        if self.params.max_restarts == 0 {
            return self.fail(reason);
        }
        if self.restarts >= self.params.max_restarts {
            let max = self.params.max_restarts;
            return self.fail(format!(
                "{reason} (no restart left: {} of cluster.max_restarts = {max} used)",
                self.restarts
            ));
        }
        self.restart(reason, now)
    }

    /// Ends the generation: survivors will be told to rejoin, lost workers are replaced, and the
    /// next generation starts from the newest intact checkpoint once everyone is back.
    fn restart(&mut self, reason: String, now: Instant) -> Vec<Action> {
        self.restarts += 1;
        self.generation += 1;
        let timeout = self.params.heartbeat_timeout;
        let is_lost =
            |m: &Member| m.exited || (!m.finished && now.duration_since(m.last_seen) > timeout);
        // A worker that already registered again under its identity needs no replacement.
        let mut replace: Vec<String> = std::mem::take(&mut self.gone);
        for m in self.members.values().filter(|m| is_lost(m)) {
            if !replace.contains(&m.info.worker_id) {
                replace.push(m.info.worker_id.clone());
            }
        }
        replace.retain(|id| !self.early.iter().any(|e| &e.worker_id == id));
        if !self.members.is_empty() {
            self.previous = self.members.keys().cloned().collect();
        }
        // Everyone of the ended generation registers again; a worker already waiting in a
        // rendezvous (this is a restart during a regroup) keeps its place unless it is lost.
        if self.phase == Phase::Running {
            self.members.clear();
        } else {
            self.members.retain(|_, m| !is_lost(m));
        }
        self.by_rank.clear();
        for info in std::mem::take(&mut self.early) {
            self.members
                .insert(info.worker_id.clone(), Member::new(info, now));
        }
        self.phase = Phase::Rendezvous;
        self.rendezvous_started = now;
        let set_aside = self.damaged.take();
        if let Some((dir, _)) = &set_aside {
            self.committed.retain(|c| c != dir);
        }
        self.resume_point_wanted = Some(set_aside);
        let mut actions = self.discard_parts();
        actions.push(Action::Restart {
            generation: self.generation,
            restart: self.restarts,
            max: self.params.max_restarts,
            reason,
            replace,
        });
        actions.extend(self.ask_resume_point());
        actions
    }

    /// Asks the driver for the checkpoint to restart from, once no commit is in flight (so
    /// the newest one is among the candidates).
    pub(super) fn ask_resume_point(&mut self) -> Vec<Action> {
        if self.commits_in_flight > 0 {
            return Vec::new();
        }
        let Some(set_aside) = self.resume_point_wanted.take() else {
            return Vec::new();
        };
        self.resume_point_asked = true;
        vec![Action::ChooseResumePoint {
            candidates: self.committed.iter().rev().cloned().collect(),
            set_aside,
        }]
    }

    /// After the rejoin timeout: continue on the workers that are back, if at least
    /// `min_workers` are and the global batch divides among them. None: it cannot.
    pub(super) fn shrink(&mut self, now: Instant) -> Option<Vec<Action>> {
        let back = self.members.len() as u32;
        if back < self.params.min_workers.max(1) || back >= self.world_size {
            return None;
        }
        // Micro-batches per step over the whole group: what every world size must share.
        let micro_batches = self.world_size * self.grad_accum_steps;
        if !micro_batches.is_multiple_of(back) {
            let reason = format!(
                "only {back} of {} workers came back, and the global batch ({micro_batches} micro-batches per step) does not divide among {back}; set cluster.min_workers to a size that divides it, or training.grad_accum_steps so that it does",
                self.world_size
            );
            return Some(self.fail(reason));
        }
        let from = (self.world_size, self.grad_accum_steps);
        self.world_size = back;
        self.grad_accum_steps = micro_batches / back;
        let mut actions = vec![Action::Shrink {
            from: from.0,
            to: back,
            grad_accum_steps: (from.1, self.grad_accum_steps),
        }];
        actions.extend(self.maybe_assign(now));
        Some(actions)
    }
}
