//! Reports from the (blocking) training thread to the coordinator.
//!
//! Step and eval reports are queued and sent, in order, by one task on the agent's runtime: a
//! step never waits for a round trip to the coordinator. A checkpoint commit needs the answer,
//! so it waits, after the queue ahead of it has drained (the coordinator hears of step N
//! before it commits step N); so does [`GrpcReporter::flush`], before the final report.

use super::{Agent, Membership, Signal};
use crate::checkpoint::Staged;
use crate::spec::Placement;
use crate::train::{EvalResult, Reporter, StepStats, TrainPhase};
use ferrotune_proto::v1 as pb;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A report that has not arrived within this is given up on (and logged): the heartbeat loop,
/// not the reports, decides whether the coordinator is gone.
const REPORT_LIMIT: Duration = Duration::from_secs(30);

enum Queued {
    Step(pb::StepReport),
    Eval(pb::EvalReport),
    Samples(pb::SampleReport),
    /// Answered once everything queued before it has been sent.
    Flush(oneshot::Sender<()>),
}

pub struct GrpcReporter {
    runtime: tokio::runtime::Handle,
    agent: Agent,
    placement: Placement,
    membership: Arc<Membership>,
    queue: mpsc::UnboundedSender<Queued>,
}

impl GrpcReporter {
    pub fn new(
        runtime: tokio::runtime::Handle,
        agent: Agent,
        placement: Placement,
        membership: Arc<Membership>,
    ) -> GrpcReporter {
        let (queue, pending) = mpsc::unbounded_channel();
        runtime.spawn(send_in_order(agent.clone(), pending));
        GrpcReporter {
            runtime,
            agent,
            placement,
            membership,
            queue,
        }
    }

    /// Waits until every queued report has been sent (or given up on).
    pub fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).is_ok() {
            let _ = self.runtime.block_on(wait);
        }
    }
}

async fn send_in_order(agent: Agent, mut pending: mpsc::UnboundedReceiver<Queued>) {
    while let Some(item) = pending.recv().await {
        let mut client = agent.client.clone();
        let (what, sent) = match item {
            Queued::Step(r) => (
                "step",
                tokio::time::timeout(REPORT_LIMIT, client.report_step(r))
                    .await
                    .map(|r| r.map(|_| ())),
            ),
            Queued::Eval(r) => (
                "eval",
                tokio::time::timeout(REPORT_LIMIT, client.report_eval(r))
                    .await
                    .map(|r| r.map(|_| ())),
            ),
            Queued::Samples(r) => (
                "samples",
                tokio::time::timeout(REPORT_LIMIT, client.report_samples(r))
                    .await
                    .map(|r| r.map(|_| ())),
            ),
            Queued::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{what} report not delivered: {}", e.message()),
            Err(_) => tracing::warn!("{what} report not delivered within {REPORT_LIMIT:?}"),
        }
    }
}

impl Reporter for GrpcReporter {
    fn step(&self, s: &StepStats) {
        self.membership.set_step(s.step, s.step_seconds);
        // Every rank's step time rides on its heartbeats; the figures go out from rank 0.
        if self.placement.rank != 0 {
            return;
        }
        let report = pb::StepReport {
            rank: self.placement.rank as u32,
            generation: self.placement.generation,
            step: s.step,
            loss: s.loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            tokens: s.tokens,
            input_tokens: s.input_tokens,
            step_seconds: s.step_seconds,
        };
        // Only fails once the runtime is gone, when nobody is left to tell.
        let _ = self.queue.send(Queued::Step(report));
    }

    fn samples(&self, phase: &str, samples: &[crate::report::Sample]) {
        let report = pb::SampleReport {
            rank: self.placement.rank as u32,
            generation: self.placement.generation,
            phase: phase.into(),
            samples: samples
                .iter()
                .map(|s| pb::Sample {
                    dataset: s.dataset.clone(),
                    index: s.index,
                    prompt: s.prompt.clone(),
                    answer: s.answer.clone(),
                    reference: s.reference.clone(),
                })
                .collect(),
        };
        let _ = self.queue.send(Queued::Samples(report));
    }

    fn eval(&self, phase: &str, step: u64, result: &EvalResult) {
        let report = pb::EvalReport {
            rank: self.placement.rank as u32,
            generation: self.placement.generation,
            step,
            phase: phase.into(),
            loss: result.loss,
            tokens: result.tokens,
            tasks: result
                .tasks
                .iter()
                .map(|t| pb::TaskEval {
                    name: t.name.clone(),
                    loss: t.loss,
                    tokens: t.tokens,
                })
                .collect(),
        };
        let _ = self.queue.send(Queued::Eval(report));
    }

    fn commit_checkpoint(&self, staged: &Staged) -> Result<PathBuf, String> {
        self.flush();
        let step = staged.step;
        let request = pb::CheckpointReady {
            rank: self.placement.rank as u32,
            generation: self.placement.generation,
            step,
            staging_dir: staged.dir.to_string_lossy().into_owned(),
            is_final: staged.is_final,
            stall_seconds: staged.stall_seconds,
            write_seconds: staged.write_seconds,
            parts: staged.parts,
            files: staged
                .files
                .iter()
                .map(|f| pb::StagedFile {
                    path: f.path.clone(),
                    bytes: f.bytes,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        };
        let committed = self
            .runtime
            .block_on(self.agent.client.clone().commit_checkpoint(request))
            .map_err(|e| format!("commit of step {step} refused: {}", e.message()))?
            .into_inner();
        if committed.pending {
            tracing::debug!(
                step,
                "checkpoint part accepted; it commits with the other ranks'"
            );
            return Ok(PathBuf::new());
        }
        if committed.path.is_empty() {
            return Err(format!(
                "commit of step {step}: the coordinator answered without a checkpoint path"
            ));
        }
        Ok(PathBuf::from(committed.path))
    }

    fn abort_reason(&self) -> Option<String> {
        match self.membership.signal()? {
            Signal::Rejoin => Some("the group is re-formed after a failure".into()),
            Signal::Stop(reason) => Some(reason),
        }
    }

    fn phase(&self, phase: TrainPhase) {
        self.membership.set_phase(phase);
    }
}
