//! Fault injection for the recovery tests: `FERROTUNE_TEST_FAULT=POINT:RANK:STEP:MARKER` makes
//! rank RANK kill itself with SIGKILL when it reaches POINT (`allreduce`: inside the gradient
//! all-reduce; `checkpoint_write`: with a checkpoint half staged) while training step STEP
//! (1-based), once: the marker file is created first and a marker that exists disarms the
//! point, so the replacement (which inherits the environment) runs on. The marker records
//! where the kill happened, for the test to assert.
//!
//! Unset (always, outside tests), every check is one relaxed atomic load.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

const ENV: &str = "FERROTUNE_TEST_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    AllReduce,
    CheckpointWrite,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::AllReduce => "allreduce",
            Point::CheckpointWrite => "checkpoint_write",
        }
    }
}

struct Armed {
    point: String,
    rank: usize,
    step: u64,
    marker: std::path::PathBuf,
}

static RANK: AtomicUsize = AtomicUsize::new(usize::MAX);
static STEP: AtomicU64 = AtomicU64::new(0);

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let text = std::env::var(ENV).ok()?;
            let mut parts = text.splitn(4, ':');
            let point = parts.next()?.to_string();
            let rank = parts.next()?.parse().ok()?;
            let step = parts.next()?.parse().ok()?;
            let marker = parts.next()?.into();
            Some(Armed {
                point,
                rank,
                step,
                marker,
            })
        })
        .as_ref()
}

/// Where the training loop is: this rank, training step `step` (1-based).
pub fn at(rank: usize, step: u64) {
    RANK.store(rank, Ordering::Relaxed);
    STEP.store(step, Ordering::Relaxed);
}

/// Kills this process if the armed fault is `point` at the current rank and step.
pub fn point(point: Point) {
    point_at(point, STEP.load(Ordering::Relaxed));
}

/// Like [`point`], for work that belongs to `step` whatever the loop does meanwhile (a
/// checkpoint written in the background).
pub fn point_at(point: Point, step: u64) {
    let Some(a) = armed() else { return };
    if a.point != point.name() || a.step != step || a.rank != RANK.load(Ordering::Relaxed) {
        return;
    }
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let record = format!(
        "{} rank {} step {} pid {} unix_ms {unix_ms}\n",
        point.name(),
        a.rank,
        step,
        std::process::id()
    );
    // create_new: only the first instance to get here fires.
    let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a.marker)
    else {
        return;
    };
    let _ = std::io::Write::write_all(&mut file, record.as_bytes());
    let _ = file.sync_all();
    eprintln!("fault injection: killing this worker at {record}");
    // SAFETY: kill(2) on our own pid; nothing after it runs.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
