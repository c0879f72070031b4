//! Seeing the run: what the driver tells the observer (steps, evals, checkpoints, the group,
//! heartbeats, restarts, the outcome) becomes Prometheus metrics (`prom.rs`), a JSON status
//! and a live page (`http.rs`), and a history file that outlives the process (`history.rs`).
//!
//! The driver's event loop only updates in-memory state under a short lock and queues history
//! records; scrapes and page loads read that state on the HTTP server's own tasks.

pub mod history;
pub mod http;
pub mod plot;
mod prom;
pub mod report;

use crate::job::Telemetry;
use crate::metrics::{EvalMetrics, Sample, StepMetrics};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Serves the dashboard on `listener` (bound at startup) until `stop` fires.
pub fn start(
    listener: std::net::TcpListener,
    observer: Arc<Observer>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        let stopped = async {
            let _ = stop.await;
        };
        if let Err(e) = http::serve(listener, observer, stopped).await {
            tracing::warn!("the dashboard stopped: {e}");
        }
    });
    Ok(())
}

/// `coordinator dashboard`: serves the page for the job whose history is in `dir` on
/// `listener` until Ctrl-C (a finished job, or one another coordinator runs).
pub fn serve_history(
    dir: std::path::PathBuf,
    listener: std::net::TcpListener,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let interrupted = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        http::serve(listener, Arc::new(http::HistoryDir(dir)), interrupted).await
    })
}

/// One point of the loss curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct Point {
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct WorkerView {
    rank: u32,
    worker_id: String,
    host: String,
    #[serde(skip)]
    last_heartbeat: Instant,
    #[serde(skip)]
    telemetry: Telemetry,
}

struct State {
    job: String,
    total_steps: u64,
    world_size: u32,
    state: &'static str,
    reason: Option<String>,
    /// When this coordinator saw its first and its latest step (for the ETA).
    first_step: Option<(Instant, u64)>,
    latest: Option<StepMetrics>,
    history: Vec<Point>,
    evals: Vec<Value>,
    workers: BTreeMap<u32, WorkerView>,
    checkpoints: Vec<Value>,
    generation: u64,
    restarts: u32,
    started: Instant,
    /// A worker whose last heartbeat is older than this shows as silent (three missed beats).
    silent_after: f64,
}

/// Shared by the driver (writes) and the HTTP server (reads).
pub struct Observer {
    state: Mutex<State>,
    prom: prom::Instruments,
    history: Mutex<history::History>,
}

impl Observer {
    pub fn new(
        job: &str,
        total_steps: u64,
        world_size: u32,
        heartbeat_interval: std::time::Duration,
        checkpoint_dir: &Path,
    ) -> Arc<Self> {
        let prom = prom::Instruments::new(job);
        prom.total_steps(total_steps);
        prom.state("starting");
        let history = history::History::open(checkpoint_dir);
        history.record(
            "start",
            json!({"job": job, "total_steps": total_steps, "world_size": world_size}),
        );
        Arc::new(Observer {
            state: Mutex::new(State {
                job: job.to_string(),
                total_steps,
                world_size,
                state: "starting",
                reason: None,
                first_step: None,
                latest: None,
                history: Vec::new(),
                evals: Vec::new(),
                workers: BTreeMap::new(),
                checkpoints: Vec::new(),
                generation: 0,
                restarts: 0,
                started: Instant::now(),
                silent_after: 3.0 * heartbeat_interval.as_secs_f64(),
            }),
            prom,
            history: Mutex::new(history),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, kind: &str, fields: Value) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(kind, fields);
    }

    fn set_state(&self, s: &mut State, state: &'static str) {
        s.state = state;
        self.prom.state(state);
    }

    /// The job continues from a committed checkpoint of an earlier run.
    pub fn resumed(&self, step: u64, dir: &Path) {
        self.record(
            "resumed",
            json!({"step": step, "checkpoint": dir.to_string_lossy()}),
        );
    }

    pub fn rendezvous(&self) {
        let mut s = self.lock();
        self.set_state(&mut s, "rendezvous");
    }

    /// A generation started with these workers (rank, worker id, host).
    pub fn generation(&self, generation: u64, roster: Vec<(u32, String, String)>) {
        let now = Instant::now();
        let mut s = self.lock();
        s.generation = generation;
        s.workers = roster
            .into_iter()
            .map(|(rank, worker_id, host)| {
                let view = WorkerView {
                    rank,
                    worker_id,
                    host,
                    last_heartbeat: now,
                    telemetry: Telemetry::default(),
                };
                (rank, view)
            })
            .collect();
        self.prom.generation(generation, s.workers.len());
        self.set_state(&mut s, "training");
    }

    pub fn heartbeat(&self, rank: u32, telemetry: &Telemetry) {
        if let Some(w) = self.lock().workers.get_mut(&rank) {
            w.last_heartbeat = Instant::now();
            w.telemetry = *telemetry;
        }
    }

    pub fn step(&self, m: &StepMetrics) {
        self.prom.step(m);
        let tokens_per_s = m.input_tokens as f64 / m.step_seconds.max(1e-9);
        {
            let mut s = self.lock();
            let now = Instant::now();
            match s.first_step {
                Some((_, first)) if m.step > first => {}
                _ => s.first_step = Some((now, m.step)),
            }
            // A step at or before the last one was replayed after a restart: the curve keeps
            // the step as last trained.
            if s.history.last().is_some_and(|p| p.step >= m.step) {
                s.history.retain(|p| p.step < m.step);
            }
            s.history.push(Point {
                step: m.step,
                loss: m.loss,
                lr: m.lr,
                grad_norm: m.grad_norm,
                tokens_per_s,
            });
            s.latest = Some(m.clone());
        }
        self.record(
            "step",
            json!({
                "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                "tokens": m.tokens, "input_tokens": m.input_tokens,
                "step_seconds": m.step_seconds,
            }),
        );
    }

    pub fn eval(&self, m: &EvalMetrics) {
        self.prom.eval(m);
        let tasks: Vec<Value> = m
            .tasks
            .iter()
            .map(|t| json!({"name": t.name, "loss": t.loss, "tokens": t.tokens}))
            .collect();
        let record = json!({
            "step": m.step, "phase": m.phase, "loss": m.loss, "tokens": m.tokens, "tasks": tasks,
        });
        self.lock().evals.push(record.clone());
        self.record("eval", record);
    }

    /// A rank's greedy answers for the eval report.
    pub fn samples(&self, phase: &str, samples: &[Sample]) {
        self.record("samples", json!({"phase": phase, "samples": samples}));
    }

    pub fn checkpoint(&self, step: u64, path: &Path, timing: Option<(f64, f64)>) {
        let (stall, write) = timing.unwrap_or((0.0, 0.0));
        self.prom.checkpoint(stall, write);
        let record = json!({
            "step": step, "path": path.to_string_lossy(), "stall_seconds": stall,
            "write_seconds": write,
        });
        self.lock().checkpoints.push(record.clone());
        self.record("checkpoint", record);
    }

    pub fn restart(&self, generation: u64, restart: u32, reason: &str) {
        self.prom.restart();
        {
            let mut s = self.lock();
            s.restarts = restart;
            self.set_state(&mut s, "restarting");
        }
        self.record(
            "restart",
            json!({"generation": generation, "restart": restart, "reason": reason}),
        );
    }

    /// The job ended: `state` is succeeded (with its final checkpoint, where the history
    /// thread writes the eval report), failed or interrupted.
    pub fn finished(
        &self,
        state: &'static str,
        reason: Option<String>,
        final_checkpoint: Option<&str>,
    ) {
        {
            let mut s = self.lock();
            self.set_state(&mut s, state);
            s.reason = reason.clone();
        }
        if state == "failed" {
            self.record("failure", json!({"reason": reason}));
        }
        let memory: Vec<Value> = self
            .lock()
            .workers
            .values()
            .filter(|w| w.telemetry.memory_peak > 0)
            .map(|w| {
                json!({"rank": w.rank, "baseline_bytes": w.telemetry.memory_baseline,
                       "peak_bytes": w.telemetry.memory_peak})
            })
            .collect();
        if !memory.is_empty() {
            self.record("memory", json!({ "workers": memory }));
        }
        self.record(
            "end",
            json!({"outcome": state, "final_checkpoint": final_checkpoint}),
        );
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .close();
    }

    /// The Prometheus text of every metric, heartbeat ages as of now.
    pub fn metrics_text(&self) -> String {
        {
            let s = self.lock();
            let now = Instant::now();
            self.prom.per_rank(s.workers.values().map(|w| {
                let age = now.duration_since(w.last_heartbeat).as_secs_f64();
                (w.rank, age, w.telemetry)
            }));
        }
        self.prom.encode()
    }

    /// `/api/status`: the job, its progress and ETA, the latest figures, the loss history, the
    /// workers, evals and checkpoints.
    pub fn status(&self) -> Value {
        let s = self.lock();
        let now = Instant::now();
        let step = s.latest.as_ref().map_or(0, |m| m.step);
        let eta = match (s.first_step, s.total_steps > step) {
            (Some((at, first)), true) if step > first => {
                let per_step = now.duration_since(at).as_secs_f64() / (step - first) as f64;
                Some(per_step * (s.total_steps - step) as f64)
            }
            _ => None,
        };
        let workers: Vec<Value> = s
            .workers
            .values()
            .map(|w| {
                let age = now.duration_since(w.last_heartbeat).as_secs_f64();
                json!({
                    "rank": w.rank, "worker_id": w.worker_id, "host": w.host,
                    "last_heartbeat_seconds": age,
                    "state": if age > s.silent_after { "silent" } else { "alive" },
                    "step_seconds": w.telemetry.step_seconds,
                    "memory_baseline_bytes": w.telemetry.memory_baseline,
                    "memory_peak_bytes": w.telemetry.memory_peak,
                })
            })
            .collect();
        let latest = s.latest.as_ref().map(|m| {
            json!({
                "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                "tokens_per_s": m.input_tokens as f64 / m.step_seconds.max(1e-9),
                "learned_tokens_per_s": m.tokens as f64 / m.step_seconds.max(1e-9),
                "step_seconds": m.step_seconds,
            })
        });
        json!({
            "job": s.job,
            "state": s.state,
            "reason": s.reason,
            "step": step,
            "total_steps": s.total_steps,
            "eta_seconds": eta,
            "elapsed_seconds": now.duration_since(s.started).as_secs_f64(),
            "world_size": s.world_size,
            "generation": s.generation,
            "restarts": s.restarts,
            "latest": latest,
            "history": s.history,
            "evals": s.evals,
            "workers": workers,
            "checkpoints": s.checkpoints,
        })
    }
}
