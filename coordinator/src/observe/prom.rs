//! The Prometheus side of the observer: one registry whose every metric carries the `job` label,
//! through `prometheus-client` (the Prometheus project's own Rust client: typed metrics, no
//! global registry, OpenMetrics text that Prometheus scrapes natively).

use crate::job::Telemetry;
use crate::metrics::{EvalMetrics, StepMetrics};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;
type Labelled = Family<Vec<(String, String)>, FloatGauge>;

/// The job's states, exported as `ferrotune_job_state{state="…"}` = 1 for the current one.
pub const STATES: [&str; 7] = [
    "starting",
    "rendezvous",
    "training",
    "restarting",
    "succeeded",
    "failed",
    "interrupted",
];

pub struct Instruments {
    registry: Registry,
    step: FloatGauge,
    total_steps: FloatGauge,
    steps: Counter,
    loss: FloatGauge,
    lr: FloatGauge,
    grad_norm: FloatGauge,
    tokens_learned: Counter,
    tokens_read: Counter,
    tokens_per_second: Labelled,
    step_seconds: Histogram,
    heartbeat_age: Labelled,
    rank_step_seconds: Labelled,
    rank_memory_peak: Labelled,
    rank_memory_baseline: Labelled,
    checkpoints: Counter,
    checkpoint_write: FloatGauge,
    checkpoint_stall: FloatGauge,
    checkpoint_stall_total: FloatCounter,
    restarts: Counter,
    generation: FloatGauge,
    eval_loss: Labelled,
    state: Labelled,
    workers: FloatGauge,
}

impl Instruments {
    pub fn new(job: &str) -> Instruments {
        let mut root = Registry::with_prefix("ferrotune");
        let r = root.sub_registry_with_label(("job".into(), job.to_string().into()));
        let i = Instruments {
            registry: Registry::default(),
            step: FloatGauge::default(),
            total_steps: FloatGauge::default(),
            steps: Counter::default(),
            loss: FloatGauge::default(),
            lr: FloatGauge::default(),
            grad_norm: FloatGauge::default(),
            tokens_learned: Counter::default(),
            tokens_read: Counter::default(),
            tokens_per_second: Labelled::default(),
            // 10 ms .. ~40 min.
            step_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
            heartbeat_age: Labelled::default(),
            rank_step_seconds: Labelled::default(),
            rank_memory_peak: Labelled::default(),
            rank_memory_baseline: Labelled::default(),
            checkpoints: Counter::default(),
            checkpoint_write: FloatGauge::default(),
            checkpoint_stall: FloatGauge::default(),
            checkpoint_stall_total: FloatCounter::default(),
            restarts: Counter::default(),
            generation: FloatGauge::default(),
            eval_loss: Labelled::default(),
            state: Labelled::default(),
            workers: FloatGauge::default(),
        };
        r.register("step", "The last optimizer step reported", i.step.clone());
        r.register(
            "total_steps",
            "Optimizer steps the job runs",
            i.total_steps.clone(),
        );
        r.register(
            "optimizer_steps",
            "Optimizer steps reported to this coordinator",
            i.steps.clone(),
        );
        r.register(
            "loss",
            "Training loss of the last step (mean over learned tokens)",
            i.loss.clone(),
        );
        r.register(
            "learning_rate",
            "Learning rate of the last step",
            i.lr.clone(),
        );
        r.register(
            "grad_norm",
            "Global gradient norm of the last step, before clipping",
            i.grad_norm.clone(),
        );
        r.register(
            "learned_tokens",
            "Labelled tokens trained on, over all ranks",
            i.tokens_learned.clone(),
        );
        r.register(
            "read_tokens",
            "Non-padding tokens read (prompts included), over all ranks",
            i.tokens_read.clone(),
        );
        r.register(
            "tokens_per_second",
            "Throughput of the last step, over all ranks (kind: read or learned)",
            i.tokens_per_second.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "Optimizer step time",
            Unit::Seconds,
            i.step_seconds.clone(),
        );
        r.register_with_unit(
            "heartbeat_age",
            "Time since each rank's last heartbeat",
            Unit::Seconds,
            i.heartbeat_age.clone(),
        );
        r.register_with_unit(
            "rank_step_duration",
            "Each rank's own time for its latest optimizer step",
            Unit::Seconds,
            i.rank_step_seconds.clone(),
        );
        r.register_with_unit(
            "rank_memory_peak",
            "Each worker's peak resident memory since training was set up",
            Unit::Bytes,
            i.rank_memory_peak.clone(),
        );
        r.register_with_unit(
            "rank_memory_baseline",
            "Each worker's resident memory before its model was loaded",
            Unit::Bytes,
            i.rank_memory_baseline.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints committed",
            i.checkpoints.clone(),
        );
        r.register_with_unit(
            "checkpoint_write",
            "Background write time of the last committed checkpoint",
            Unit::Seconds,
            i.checkpoint_write.clone(),
        );
        r.register_with_unit(
            "checkpoint_stall",
            "Training held up by the last committed checkpoint",
            Unit::Seconds,
            i.checkpoint_stall.clone(),
        );
        r.register_with_unit(
            "checkpoint_stall_time",
            "Training held up by checkpoints, in all",
            Unit::Seconds,
            i.checkpoint_stall_total.clone(),
        );
        r.register(
            "restarts",
            "Group restarts after a lost worker",
            i.restarts.clone(),
        );
        r.register(
            "generation",
            "The group's generation (1 + restarts)",
            i.generation.clone(),
        );
        r.register(
            "eval_loss",
            "Held-out loss per dataset at the last evaluation",
            i.eval_loss.clone(),
        );
        r.register(
            "job_state",
            "1 for the job's current state",
            i.state.clone(),
        );
        r.register(
            "workers",
            "Workers in the current generation",
            i.workers.clone(),
        );
        Instruments {
            registry: root,
            ..i
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    pub fn total_steps(&self, total: u64) {
        self.total_steps.set(total as f64);
    }

    pub fn step(&self, m: &StepMetrics) {
        self.step.set(m.step as f64);
        self.steps.inc();
        self.loss.set(m.loss);
        self.lr.set(m.lr);
        self.grad_norm.set(m.grad_norm);
        self.tokens_learned.inc_by(m.tokens);
        self.tokens_read.inc_by(m.input_tokens);
        let seconds = m.step_seconds.max(1e-9);
        for (kind, tokens) in [("read", m.input_tokens), ("learned", m.tokens)] {
            self.tokens_per_second
                .get_or_create(&vec![("kind".into(), kind.into())])
                .set(tokens as f64 / seconds);
        }
        self.step_seconds.observe(m.step_seconds);
    }

    pub fn eval(&self, m: &EvalMetrics) {
        for t in &m.tasks {
            self.eval_loss
                .get_or_create(&vec![("dataset".into(), t.name.clone())])
                .set(t.loss);
        }
    }

    pub fn checkpoint(&self, stall: f64, write: f64) {
        self.checkpoints.inc();
        self.checkpoint_write.set(write);
        self.checkpoint_stall.set(stall);
        self.checkpoint_stall_total.inc_by(stall);
    }

    pub fn restart(&self) {
        self.restarts.inc();
    }

    pub fn generation(&self, generation: u64, workers: usize) {
        self.generation.set(generation as f64);
        self.workers.set(workers as f64);
    }

    pub fn state(&self, current: &str) {
        for s in STATES {
            let value = if s == current { 1.0 } else { 0.0 };
            self.state
                .get_or_create(&vec![("state".into(), s.into())])
                .set(value);
        }
    }

    /// Per-rank figures are set at scrape time (heartbeat ages from the observer's clock), so
    /// a rank that left the group leaves the metrics too.
    pub fn per_rank(&self, ranks: impl Iterator<Item = (u32, f64, Telemetry)>) {
        let families = [
            &self.heartbeat_age,
            &self.rank_step_seconds,
            &self.rank_memory_peak,
            &self.rank_memory_baseline,
        ];
        for f in families {
            f.clear();
        }
        for (rank, age, t) in ranks {
            let label = vec![("rank".into(), rank.to_string())];
            self.heartbeat_age.get_or_create(&label).set(age);
            if t.step_seconds > 0.0 {
                self.rank_step_seconds
                    .get_or_create(&label)
                    .set(t.step_seconds);
            }
            if t.memory_peak > 0 {
                self.rank_memory_peak
                    .get_or_create(&label)
                    .set(t.memory_peak as f64);
                self.rank_memory_baseline
                    .get_or_create(&label)
                    .set(t.memory_baseline as f64);
            }
        }
    }
}
