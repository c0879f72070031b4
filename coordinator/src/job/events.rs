//! The job state machine's vocabulary: what goes in (events), what comes out (actions), and the
//! domain types both carry.

use super::devices::{Backend, DeviceKind, WorkerDevices};
use crate::metrics::{EvalMetrics, Sample, StepMetrics};
use ferrotune_data::manifest::FileDigest;

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub host: String,
    pub local_index: u32,
    pub peer_address: String,
    /// The worker binary's version; must equal the coordinator's.
    pub version: String,
    pub devices: WorkerDevices,
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
    /// The committed checkpoint this generation starts from; None: the model.
    pub resume_from: Option<String>,
    /// Micro-batches per rank and step: raised when the group shrinks, so that the global
    /// batch stays the same.
    pub grad_accum_steps: u32,
    pub device: DeviceKind,
    pub backend: Backend,
    /// With NCCL: rank 0's unique id.
    pub nccl_id: Option<Vec<u8>>,
}

/// What a worker is doing, from its heartbeats: the progress watchdog only counts time in which
/// every worker trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerPhase {
    #[default]
    Unknown,
    Loading,
    Training,
    Eval,
    Checkpoint,
}

/// What a heartbeat says about its rank besides the phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Telemetry {
    /// Resident bytes before the model was loaded, and the peak since training was set up.
    pub memory_baseline: u64,
    pub memory_peak: u64,
    /// The rank's own time for its latest step (0 before the first).
    pub step_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Registered(WorkerInfo),
    Heartbeat {
        rank: u32,
        generation: u64,
        phase: WorkerPhase,
        /// For the dashboard only: the job's decisions never depend on it.
        telemetry: Telemetry,
    },
    StepReported {
        rank: u32,
        generation: u64,
        metrics: StepMetrics,
    },
    EvalReported {
        rank: u32,
        generation: u64,
        metrics: EvalMetrics,
    },
    SamplesReported {
        rank: u32,
        generation: u64,
        phase: String,
        samples: Vec<Sample>,
    },
    CheckpointReady {
        rank: u32,
        generation: u64,
        step: u64,
        staging_dir: String,
        is_final: bool,
        files: Vec<FileDigest>,
        /// How many ranks stage a part of this checkpoint (ZeRO: each its optimizer file);
        /// 0 or 1: rank 0's directory is all of it.
        parts: u32,
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
        generation: u64,
        ok: bool,
        error: String,
        /// The error may pass in a new generation (the worker waits to rejoin).
        retriable: bool,
        /// A file of the checkpoint this generation started from that did not match its
        /// manifest: that checkpoint is set aside and the restart takes the one before.
        damaged_file: Option<String>,
    },
    /// A worker process ended (reported by the launcher).
    WorkerExited {
        worker_id: String,
        success: bool,
        /// The exit code, when it exited rather than being killed by a signal.
        code: Option<i32>,
        status: String,
        last_line: Option<String>,
    },
    /// The driver's answer to [`Action::ChooseResumePoint`].
    ResumePointChosen {
        path: Option<String>,
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
    /// Answer the call that brought the event with an error (a report of an ended generation).
    Refuse(String),
    Progress(StepMetrics),
    Eval(EvalMetrics),
    /// A rank's answers for the eval report (phase "before" or "after").
    Samples(String, Vec<Sample>),
    /// Every writing rank has staged this checkpoint: move the other ranks' `parts` (staging
    /// directory, reported files) into rank 0's, write the manifest and rename it in place.
    /// Answers the call that brought the event and every held one of the step.
    Commit {
        step: u64,
        staging_dir: String,
        is_final: bool,
        files: Vec<FileDigest>,
        parts: Vec<(String, Vec<FileDigest>)>,
    },
    /// A part of a periodic checkpoint is in: answer its call now (pending), the rank goes on
    /// training (the ranks still writing would otherwise wait for it in the next all-reduce).
    AcceptPart,
    /// A part of the final checkpoint: its call is answered when the step commits.
    HoldPart {
        step: u64,
    },
    /// A staged checkpoint that will never be committed (its generation ended): remove it.
    Discard {
        staging_dir: String,
    },
    /// A generation ended in a failure that may pass: the survivors rejoin (their heartbeats
    /// are answered "rejoin" from now on), the launcher replaces `replace`, and the restart
    /// count (`restart` of `max`) is persisted.
    Restart {
        generation: u64,
        restart: u32,
        max: u32,
        reason: String,
        replace: Vec<String>,
    },
    /// Find the newest intact checkpoint among `candidates` (newest first), after setting
    /// aside `set_aside` (a checkpoint with a damaged file), and answer with
    /// [`Event::ResumePointChosen`].
    ChooseResumePoint {
        candidates: Vec<String>,
        set_aside: Option<(String, String)>,
    },
    /// The lost workers did not come back: the job continues on `to` workers with the same
    /// global batch.
    Shrink {
        from: u32,
        to: u32,
        grad_accum_steps: (u32, u32),
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
    Succeeded {
        final_checkpoint: Option<String>,
    },
    Failed {
        reason: String,
    },
    /// The workers cannot run the job as configured (no GPU for `device: cuda`, a mixed
    /// group): a new attempt would meet the same refusal.
    Refused {
        reason: String,
    },
    Interrupted,
}

/// How a heartbeat is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatAnswer {
    Continue,
    /// The worker's generation has ended: register again for the next one.
    Rejoin,
    /// The job is over.
    Stop(String),
}
