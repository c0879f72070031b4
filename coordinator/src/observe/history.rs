//! `<checkpoint.dir>/metrics.jsonl`: one JSON object per step report, eval, checkpoint, restart,
//! failure and resume, appended and flushed as they happen by a thread of its own (the event
//! loop never waits for the disk). It outlives the process: a resumed run appends to it, and
//! readers keep the last record per step, so steps replayed after a restart or a resume appear
//! once.

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub const FILE: &str = "metrics.jsonl";

/// Appends records to the history file from a background thread.
pub struct History {
    records: Option<mpsc::Sender<Value>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl History {
    /// Opens (creating or appending to) `<dir>/metrics.jsonl`. A history that cannot be written
    /// is reported once and the job goes on without it.
    pub fn open(dir: &Path) -> History {
        let path = dir.join(FILE);
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot write the metrics history {}: {e}", path.display());
                return History {
                    records: None,
                    writer: None,
                };
            }
        };
        let (tx, rx) = mpsc::channel::<Value>();
        let writer = std::thread::Builder::new()
            .name("metrics-history".into())
            .spawn(move || write_all(file, path, rx))
            .ok();
        History {
            records: Some(tx),
            writer,
        }
    }

    /// Queues one record: `kind` plus the fields of `fields` (an object) and the wall time.
    pub fn record(&self, kind: &str, fields: Value) {
        let mut record = json!({ "type": kind, "time": now_seconds() });
        if let (Some(r), Value::Object(extra)) = (record.as_object_mut(), fields) {
            r.extend(extra);
        }
        if let Some(tx) = &self.records {
            let _ = tx.send(record);
        }
    }

    /// Writes what is queued and stops the writer.
    pub fn close(&mut self) {
        self.records = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_all(mut file: std::fs::File, path: PathBuf, records: mpsc::Receiver<Value>) {
    let mut failed = false;
    let mut job = String::new();
    for record in records {
        let line = format!("{record}\n");
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|_| file.flush()) {
            if !failed {
                tracing::warn!(
                    "cannot append to the metrics history {}: {e}",
                    path.display()
                );
                failed = true;
            }
        }
        match record["type"].as_str() {
            Some("start") => job = record["job"].as_str().unwrap_or_default().to_string(),
            // Plots of the whole history (earlier runs included) at each checkpoint and at the
            // end, here: never on the coordinator's event loop.
            Some("checkpoint" | "end") => {
                let Some(dir) = path.parent() else { continue };
                let history = match read(dir) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!("cannot read back {}: {e}", path.display());
                        continue;
                    }
                };
                let series = super::plot::Series::from_history(&history);
                if let Err(e) = super::plot::write(dir, &job, &series) {
                    tracing::warn!("cannot draw the loss plots in {}: {e}", dir.display());
                }
                if let Some(ckpt) = record["final_checkpoint"].as_str() {
                    if let Err(e) = super::report::write(&job, Path::new(ckpt), &history) {
                        tracing::warn!("cannot write the eval report into {ckpt}: {e}");
                    }
                }
            }
            _ => {}
        }
    }
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The records of a history file in order, with replayed steps resolved: a `step` record
/// replaces every earlier `step` record of the same or a later step (a restart or a resume went
/// back to a checkpoint), so each step appears once, as last trained. Lines that are not JSON
/// (a torn last line after a crash) are skipped.
pub fn read(dir: &Path) -> std::io::Result<Vec<Value>> {
    let text = std::fs::read_to_string(dir.join(FILE))?;
    Ok(resolve(
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect(),
    ))
}

/// See [`read`].
pub fn resolve(records: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(records.len());
    // Steps arrive in order except after a restart: only then is anything removed.
    let mut last_step = 0u64;
    for r in records {
        if r["type"] == "step" {
            if let Some(step) = r["step"].as_u64() {
                if step <= last_step {
                    out.retain(|e| {
                        e["type"] != "step" || e["step"].as_u64().is_some_and(|s| s < step)
                    });
                }
                last_step = step;
            }
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_across_runs_and_replayed_steps_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = History::open(dir.path());
        for step in 1..=4u64 {
            first.record("step", json!({"step": step, "loss": 10.0 - step as f64}));
        }
        first.close();
        let mut second = History::open(dir.path());
        second.record("resumed", json!({"step": 2}));
        for step in 3..=5u64 {
            second.record("step", json!({"step": step, "loss": 100.0 + step as f64}));
        }
        second.close();
        // A torn line from a crash is skipped.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"type\": \"st").unwrap();

        let records = read(dir.path()).unwrap();
        let steps: Vec<(u64, f64)> = records
            .iter()
            .filter(|r| r["type"] == "step")
            .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
            .collect();
        assert_eq!(
            steps,
            [(1, 9.0), (2, 8.0), (3, 103.0), (4, 104.0), (5, 105.0)]
        );
        assert!(records
            .iter()
            .any(|r| r["type"] == "resumed" && r["step"] == 2));
        assert!(records.iter().all(|r| r["time"].as_f64().unwrap() > 1e9));
    }
}
