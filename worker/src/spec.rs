//! What a worker is told to do, as validated domain types (the agent converts from protobuf).

use crate::model::DType;
use ferrotune_data::pack::Overlong;
use ferrotune_data::record::Format;
use std::path::PathBuf;
use std::time::Duration;

/// This worker's place in the current generation of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub generation: u64,
    /// Collective address of rank (rank + 1) % world_size.
    pub next_peer_address: String,
    /// The committed checkpoint this generation starts from (None: the model). After a
    /// restart it is the newest intact one, whatever the job was launched with.
    pub resume_from: Option<std::path::PathBuf>,
    /// This generation's gradient accumulation when the coordinator changed it (a smaller
    /// group keeps the global batch); None: the spec's.
    pub grad_accum_steps: Option<usize>,
    pub backend: Backend,
    /// Where this worker trains: chosen by `device::choose` from the spec's device kind and
    /// the local rank (the CPU until then).
    pub device: tch::Device,
}

/// How the group reduces gradients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The TCP ring over host memory.
    Ring,
    /// NCCL on the GPUs; every rank builds its communicator from rank 0's unique id.
    Nccl { unique_id: Vec<u8> },
}

#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub job_name: String,
    pub seed: u64,
    pub model_path: PathBuf,
    pub random_init: bool,
    pub datasets: Vec<DatasetSpec>,
    pub seq_len: usize,
    /// Held-out sequences evaluated per dataset.
    pub eval_max_sequences: usize,
    /// Held-out prompts per prompt-bearing dataset answered for the eval report.
    pub eval_samples: usize,
    pub packing: bool,
    pub overlong: Overlong,
    pub train_on_inputs: bool,
    pub chat_template: Option<String>,
    /// data.chat_template_kwargs.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    pub cache_dir: PathBuf,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
    pub micro_batch_size: usize,
    pub grad_accum_steps: usize,
    /// How optimizer state and gradients are split across the ranks (zero/).
    pub zero_stage: crate::zero::Stage,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_every_steps: u64,
    /// On-disk dtype of checkpoints; None keeps the base model's (float32 if it names none).
    pub checkpoint_dtype: Option<DType>,
    pub checkpoint_max_shard_bytes: u64,
    /// A committed checkpoint to continue from: weights, optimizer state, step, data cursor.

    /// Recompute decoder layers in backward rather than storing their activations.
    pub activation_checkpointing: bool,
    pub precision: crate::precision::Precision,
    /// 0: divide this host's cores among its workers.
    pub intra_op_threads: usize,
    pub collective_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// The coordinator declares a silent worker lost after this; the worker gives up on an
    /// unreachable coordinator after the same time.
    pub heartbeat_timeout: Duration,
    pub bucket_bytes: usize,
    pub log_every_steps: u64,
    /// "cpu" or "cuda", as the coordinator resolved it for the group.
    pub device_kind: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    pub name: String,
    pub path: PathBuf,
    pub format: Format,
    pub weight: f64,
    pub eval_path: Option<PathBuf>,
}
