//! The driver's work off its event loop: renewing the lease, committing checkpoints (file IO
//! on shared storage), and answering calls after the job is decided.

use crate::checkpoint;
use crate::job::{Event, HeartbeatAnswer};
use crate::lease::{Lease, LeaseError};
use crate::server::{Inbound, Reply};
use ferrotune_data::manifest::FileDigest;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// One checkpoint to commit: rank 0's staging directory and the other ranks' parts, each with
/// the files its writer reported.
pub(super) struct CommitOrder {
    pub root: PathBuf,
    pub keep: u32,
    pub step: u64,
    pub is_final: bool,
    pub main: (PathBuf, Vec<FileDigest>),
    pub parts: Vec<(PathBuf, Vec<FileDigest>)>,
}

/// Commits off the event loop (sizes, moves, manifest, renames, retention), so that heartbeats
/// keep being counted meanwhile; `done` hears the result, with the calls to answer.
pub(super) fn spawn_commit(
    order: CommitOrder,
    lease: Arc<Lease>,
    writers: Vec<oneshot::Sender<Reply>>,
    done: mpsc::UnboundedSender<CommitDone>,
) {
    let (step, is_final) = (order.step, order.is_final);
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(move || {
            // A coordinator whose directory was taken over commits nothing.
            lease.check().map_err(|e| e.to_string())?;
            let CommitOrder {
                root,
                keep,
                main,
                parts,
                ..
            } = order;
            let main = (main.0.as_path(), main.1.as_slice());
            checkpoint::commit(&root, main, &parts, step, is_final, keep).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let _ = done.send(CommitDone {
            step,
            is_final,
            result,
            writers,
        });
    });
}

/// Renews the lease until the job ends (the task is aborted then), off the event loop: a slow
/// shared filesystem must not delay heartbeats. Reports once if the lease was taken over.
pub(super) async fn keep_lease(lease: Arc<Lease>, lost: mpsc::UnboundedSender<String>) {
    let mut ticker = tokio::time::interval(lease.renew_every());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let l = lease.clone();
        match tokio::task::spawn_blocking(move || l.renew()).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ LeaseError::Lost { .. })) => {
                let _ = lost.send(e.to_string());
                return;
            }
            // A failed write is retried at the next tick; the timeout allows for three.
            Ok(Err(e)) => tracing::warn!("could not renew the checkpoint directory's lease: {e}"),
            Err(_) => return,
        }
    }
}

/// A checkpoint commit that has finished, and the writer's call still to answer.
pub(super) struct CommitDone {
    pub step: u64,
    pub is_final: bool,
    pub result: Result<PathBuf, String>,
    /// The calls to answer: the last part's, and the held ones of a final checkpoint.
    pub writers: Vec<oneshot::Sender<Reply>>,
}

/// After the job is decided: every call is answered "the job is over", until each rank in
/// `to_tell` has heard it (and `min` has passed), or `max` has passed.
pub(super) async fn drain(
    inbound: &mut mpsc::Receiver<Inbound>,
    mut to_tell: std::collections::HashSet<u32>,
    min: Duration,
    max: Duration,
) {
    let start = tokio::time::Instant::now();
    loop {
        let until = if to_tell.is_empty() {
            start + min
        } else {
            start + max
        };
        let Ok(Some(inb)) = tokio::time::timeout_at(until, inbound.recv()).await else {
            return;
        };
        let over = "the job is over".to_string();
        let answer = match inb.event {
            Event::Heartbeat { rank, .. } => {
                to_tell.remove(&rank);
                Reply::Heartbeat(HeartbeatAnswer::Stop(over))
            }
            Event::CheckpointReady { .. } => Reply::Committed(Err(over)),
            // A late Finish is an acknowledged report, not a refusal.
            Event::Finished { .. } => Reply::Ack,
            _ => Reply::Rejected(over),
        };
        let _ = inb.reply.send(answer);
    }
}
