//! `coordinator plan`: what one worker will hold in memory, term by term, before any process
//! starts, and whether it fits. `launch` runs the same estimate and refuses a job that cannot.
//!
//! The terms follow what the worker allocates (worker/src/train.rs): weights, a flat gradient
//! buffer, two AdamW moments, under bf16 fp32 masters plus a bf16 compute copy and its
//! gradients, the checkpoint snapshot of rank 0, and the activations autograd keeps for
//! backward. The activation model counts, per token and layer, the tensors the decoder saves
//! (two per RMSNorm, q/k/v after RoPE and the attention output, the four SwiGLU intermediates,
//! the residual stream; on the CPU also the attention probabilities, seq_len per head), plus
//! one more layer's worth for the gradients alive while a layer runs backward, plus one loss
//! chunk's logits (fp32 logits, log-softmax and their two gradients; the loss never holds the
//! whole batch's). It was checked against the
//! measured peak resident memory of real workers (tests/tests/plan.rs): tiny model, the ~30M
//! bench model, and a third shape not used while writing it.

use crate::config::{DeviceSetting, JobConfig, LauncherKind};
use crate::job::devices::GpuNeed;
use indicatif::HumanBytes;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: cannot read the model's config.json: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// The decoder dimensions the estimate needs, from Hugging Face `config.json` (the worker
/// reads and checks the full config; absent fields take the Llama family's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub vocab: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub tied: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's and Gemma 3's per-head query and key norms (head_dim weights each, per layer).
    pub qk_norm: bool,
    /// Gemma 2 and 3: norms after attention and before and after the MLP (4 per layer, not 2).
    pub sandwich_norms: bool,
}

impl Shape {
    pub fn read(model_dir: &Path) -> Result<Shape, PlanError> {
        let path = model_dir.join("config.json");
        let read_err = |message: String| PlanError::Read {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(e.to_string()))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
        Shape::from_json(&raw).map_err(|(field, message)| PlanError::Field {
            path,
            field,
            message,
        })
    }

    pub fn from_json(raw: &Value) -> Result<Shape, (&'static str, String)> {
        let int = |field: &'static str| -> Result<Option<u64>, (&'static str, String)> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(Some)
                    .ok_or((field, format!("expected a positive integer, found {v}"))),
            }
        };
        let required = |field: &'static str| {
            int(field)?.ok_or((field, "missing; a decoder config.json has it".to_string()))
        };
        let flag =
            |field: &str, default: bool| raw.get(field).and_then(Value::as_bool).unwrap_or(default);
        let hidden = required("hidden_size")?;
        let heads = required("num_attention_heads")?;
        let model_type = raw.get("model_type").and_then(Value::as_str);
        let (qwen2, qwen3) = (model_type == Some("qwen2"), model_type == Some("qwen3"));
        let gemma3 = model_type == Some("gemma3_text");
        let gemma = gemma3 || model_type == Some("gemma2");
        let attention_bias = flag("attention_bias", false);
        Ok(Shape {
            vocab: required("vocab_size")?,
            hidden,
            intermediate: required("intermediate_size")?,
            layers: required("num_hidden_layers")?,
            heads,
            kv_heads: int("num_key_value_heads")?.unwrap_or(heads),
            // Qwen3Config's class default is 128, Gemma3TextConfig's 256.
            head_dim: int("head_dim")?.unwrap_or(match (qwen3, gemma) {
                (true, _) => 128,
                (_, true) => 256,
                _ => hidden / heads,
            }),
            tied: flag("tie_word_embeddings", gemma),
            qkv_bias: attention_bias || qwen2,
            o_bias: attention_bias && !qwen2,
            mlp_bias: flag("mlp_bias", false),
            qk_norm: qwen3 || gemma3,
            sandwich_norms: gemma,
        })
    }

    pub fn parameters(&self) -> u64 {
        let (h, i) = (self.hidden, self.intermediate);
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        let bias = |on: bool, n: u64| if on { n } else { 0 };
        let attention =
            h * q + 2 * h * kv + q * h + bias(self.qkv_bias, q + 2 * kv) + bias(self.o_bias, h);
        let mlp = 3 * h * i + bias(self.mlp_bias, 2 * i + h);
        let norms = if self.sandwich_norms { 4 * h } else { 2 * h };
        let layer = attention + mlp + norms + bias(self.qk_norm, 2 * self.head_dim);
        let embeddings = self.vocab * h * if self.tied { 1 } else { 2 };
        embeddings + self.layers * layer + h
    }
}

/// Where a term lives: on a GPU job the snapshot is host memory, the rest device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    Device,
    Host,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Term {
    pub name: &'static str,
    pub bytes: u64,
    pub detail: String,
    pub place: Place,
}

/// What the estimate depends on besides the model.
#[derive(Debug, Clone)]
pub struct Settings {
    pub micro_batch: u64,
    pub seq_len: u64,
    pub bf16: bool,
    pub activation_checkpointing: bool,
    pub gpu: bool,
    pub packing: bool,
    /// Checkpoints during training (the snapshot buffers live from the start), not only at
    /// the end (allocated after the last step, when activations are gone).
    pub periodic_checkpoints: bool,
    /// training.zero_stage, and the world size its chunks divide by.
    pub zero_stage: u32,
    pub world_size: u64,
}

/// Resident memory of a worker before its model is loaded (libtorch, the runtime, the
/// tokenizer and data maps; measured here at ~120 MB on the CPU), and the CUDA context plus
/// libtorch's workspaces on a GPU.
const CPU_RUNTIME_BYTES: u64 = 160 << 20;
const GPU_RUNTIME_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerPlan {
    pub role: &'static str,
    pub terms: Vec<Term>,
    /// The peak of the device terms above the runtime (for a CPU job, what a measured peak
    /// above the pre-model baseline is compared with).
    pub peak_bytes: u64,
    pub runtime_bytes: u64,
}

impl WorkerPlan {
    /// Peak device memory (the host's for a CPU job), the runtime included.
    pub fn device_bytes(&self) -> u64 {
        self.runtime_bytes + self.peak_bytes
    }

    fn biggest(&self) -> &Term {
        self.terms
            .iter()
            .max_by_key(|t| t.bytes)
            .expect("a plan has terms")
    }
}

/// Bytes per token autograd keeps for one decoder layer, in activation elements.
fn layer_elements(shape: &Shape, s: &Settings) -> u64 {
    let (h, i) = (shape.hidden, shape.intermediate);
    let q = shape.heads * shape.head_dim;
    // CUDA's fused attention keeps a log-sum-exp per head; the CPU math path the probabilities.
    let scores = if s.gpu {
        shape.heads
    } else {
        shape.heads * s.seq_len
    };
    6 * h + 4 * q + 4 * i + scores
}

pub fn estimate(shape: &Shape, s: &Settings) -> (WorkerPlan, WorkerPlan) {
    let p = shape.parameters();
    let dev = Place::Device;
    let mut common = Vec::new();
    let mut term = |name, bytes, detail: String| {
        common.push(Term {
            name,
            bytes,
            detail,
            place: dev,
        })
    };
    let w = s.world_size.max(1);
    if s.bf16 && s.zero_stage > 0 {
        term(
            "master weights",
            (4 * p).div_ceil(w),
            format!("fp32, this rank's 1/{w} chunk"),
        );
    } else if s.bf16 {
        term("master weights", 4 * p, "fp32".into());
    }
    if s.bf16 {
        term("compute copy", 2 * p, "bf16".into());
        term(
            "gradients",
            6 * p,
            "bf16 from backward + fp32 flat buffer".into(),
        );
    } else {
        term("weights", 4 * p, "fp32".into());
        term("gradients", 4 * p, "fp32, one flat buffer".into());
    }
    if s.zero_stage == 0 {
        term("optimizer state", 8 * p, "AdamW: two fp32 moments".into());
    } else {
        term(
            "optimizer state",
            (8 * p).div_ceil(w),
            format!(
                "AdamW: two fp32 moments of this rank's 1/{w} chunk (zero_stage {})",
                s.zero_stage
            ),
        );
    }
    if s.zero_stage == 2 {
        term(
            "gradient chunk",
            (4 * p).div_ceil(w),
            "zero_stage 2: this rank's chunk of the reduce-scattered gradient".into(),
        );
    }
    let element = if s.bf16 { 2 } else { 4 };
    let tokens = s.micro_batch * s.seq_len;
    let layer = layer_elements(shape, s) * element;
    let head = 2 * shape.hidden * element;
    let per_token = if s.activation_checkpointing {
        // Layer inputs only, then one layer recomputed and run backward at a time.
        shape.layers * shape.hidden * element + 2 * layer + head
    } else {
        (shape.layers + 1) * layer + head
    };
    let mask = if s.packing && !s.gpu {
        s.micro_batch * s.seq_len * s.seq_len
    } else {
        0
    };
    // The loss runs over chunks of positions: one chunk's fp32 logits, log-softmax and their
    // two gradients at a time.
    let chunk =
        ferrotune_data::loss_chunk_positions(s.micro_batch as i64, shape.vocab as i64) as u64;
    let logits = s.micro_batch * s.seq_len.min(chunk) * shape.vocab * 4 * 4;
    let activations = tokens * per_token + mask + logits;
    term(
        "activations",
        activations,
        format!(
            "micro_batch_size {} x seq_len {} x {} layers{}",
            s.micro_batch,
            s.seq_len,
            shape.layers,
            if s.activation_checkpointing {
                ", checkpointed"
            } else {
                ""
            }
        ),
    );
    let runtime_bytes = if s.gpu {
        GPU_RUNTIME_BYTES
    } else {
        CPU_RUNTIME_BYTES
    };
    let state: u64 = common
        .iter()
        .filter(|t| t.name != "activations")
        .map(|t| t.bytes)
        .sum();
    // The checkpoint snapshot, which the background write reads while training goes on: rank 0
    // copies the fp32 weights and its moments; at zero_stage 1 and 2 every rank copies its
    // chunk of the moments (its part of the checkpoint), and under bf16 rank 0 also gathers
    // the masters to write the model files from.
    let moments = if s.zero_stage == 0 {
        8 * p
    } else {
        (8 * p).div_ceil(w)
    };
    let gathered = if s.zero_stage > 0 && s.bf16 { 4 * p } else { 0 };
    let peak = |snapshot: u64| {
        if s.gpu {
            state + activations
        } else if s.periodic_checkpoints {
            state + activations + snapshot
        } else {
            state + activations.max(snapshot)
        }
    };
    let place = if s.gpu { Place::Host } else { Place::Device };
    let mut other_terms = common.clone();
    let mut other_peak = state + activations;
    if s.zero_stage > 0 {
        other_terms.push(Term {
            name: "checkpoint snapshot",
            bytes: moments,
            detail: format!(
                "this rank's 1/{w} chunk of the moments, copied for the background write"
            ),
            place,
        });
        other_peak = peak(moments);
    }
    let other = WorkerPlan {
        role: "every other rank",
        terms: other_terms,
        peak_bytes: other_peak,
        runtime_bytes,
    };
    let snapshot = 4 * p + moments + gathered;
    let mut writer_terms = common;
    writer_terms.push(Term {
        name: "checkpoint snapshot",
        bytes: snapshot,
        detail: match (s.zero_stage, gathered) {
            (0, _) => "rank 0: fp32 weights and moments copied for the background write".into(),
            (_, 0) => format!("rank 0: fp32 weights and its 1/{w} chunk of the moments copied for the background write"),
            _ => format!("rank 0: the fp32 masters gathered from every rank, their copy and its 1/{w} chunk of the moments for the background write"),
        },
        place,
    });
    let writer = WorkerPlan {
        role: "rank 0 (writes checkpoints)",
        terms: writer_terms,
        peak_bytes: peak(snapshot),
        runtime_bytes,
    };
    (writer, other)
}

/// What a worker may use, and where that figure came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capacity {
    /// Bytes per worker.
    pub bytes: u64,
    pub source: String,
}

/// `MemAvailable` of this host (Linux), in bytes.
pub fn host_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub model: PathBuf,
    pub parameters: u64,
    pub device: &'static str,
    pub world_size: u32,
    pub zero_stage: u32,
    pub workers: Vec<WorkerPlan>,
    pub capacity: Option<Capacity>,
}

impl Plan {
    pub fn for_job(config: &JobConfig, device_memory: Option<u64>) -> Result<Plan, PlanError> {
        let gpu = config.cluster.devices.device == DeviceSetting::Cuda;
        Plan::on(config, device_memory, gpu)
    }

    /// What each GPU would need if the group trains on CUDA (`device: auto` resolves only once
    /// the workers report), for the check against the GPUs they report. None on `device: cpu`
    /// or when the model's config cannot be read (the workers will say why).
    pub fn gpu_need(config: &JobConfig) -> Option<GpuNeed> {
        if config.cluster.devices.device == DeviceSetting::Cpu {
            return None;
        }
        let plan = Plan::on(config, None, true).ok()?;
        let worst = plan.workers.iter().max_by_key(|w| w.device_bytes())?;
        let big = worst.biggest();
        Some(GpuNeed {
            bytes: worst.device_bytes(),
            biggest: format!("{}: {} MiB ({})", big.name, big.bytes >> 20, big.detail),
        })
    }

    fn on(config: &JobConfig, device_memory: Option<u64>, gpu: bool) -> Result<Plan, PlanError> {
        let shape = Shape::read(&config.model_path)?;
        let settings = Settings {
            micro_batch: u64::from(config.micro_batch_size),
            seq_len: u64::from(config.data.seq_len),
            bf16: matches!(config.precision.as_str(), "bf16" | "bfloat16"),
            activation_checkpointing: config.activation_checkpointing,
            gpu,
            packing: config.data.packing,
            periodic_checkpoints: config.checkpoint_every_steps > 0
                && config.checkpoint_every_steps < config.steps,
            zero_stage: config.zero_stage,
            world_size: u64::from(config.cluster.world_size.max(1)),
        };
        let (writer, other) = estimate(&shape, &settings);
        let world_size = config.cluster.world_size.max(1);
        let capacity = match device_memory {
            Some(bytes) => Some(Capacity {
                bytes,
                source: "--device-memory".into(),
            }),
            // Local CPU workers share this host's memory.
            None if !gpu && config.cluster.launcher == LauncherKind::Local => {
                host_available().map(|available| Capacity {
                    bytes: available / u64::from(world_size),
                    source: format!(
                        "this host's available memory ({}) shared by {world_size} local workers",
                        HumanBytes(available)
                    ),
                })
            }
            None => None,
        };
        let workers = if world_size > 1 {
            vec![writer, other]
        } else {
            vec![writer]
        };
        Ok(Plan {
            model: config.model_path.clone(),
            parameters: shape.parameters(),
            device: if gpu { "cuda" } else { "cpu" },
            world_size,
            zero_stage: config.zero_stage,
            workers,
            capacity,
        })
    }

    /// Err(reason) when a worker's estimate exceeds its capacity: the biggest term named, with
    /// what to change.
    pub fn check(&self) -> Result<(), String> {
        let Some(capacity) = &self.capacity else {
            return Ok(());
        };
        let Some(worst) = self.workers.iter().max_by_key(|w| w.device_bytes()) else {
            return Ok(());
        };
        let need = worst.device_bytes();
        if need <= capacity.bytes {
            return Ok(());
        }
        let big = worst.biggest();
        let hint = match big.name {
            "activations" => "set training.activation_checkpointing: true, or lower training.micro_batch_size (raise grad_accum_steps to keep the global batch) or data.seq_len",
            "checkpoint snapshot" => "give rank 0 more memory, or checkpoint less often (checkpoint.every_steps)",
            "optimizer state" if self.zero_stage == 0 => "set training.zero_stage: 1 (each rank keeps 1/world_size of the AdamW moments), or use workers with more memory",
            _ => "use workers with more memory, or more workers with training.zero_stage: 1 or 2",
        };
        Err(format!(
            "the job does not fit: {} needs about {} but has {} ({}); the biggest term is {}: {} ({}); {hint}. `coordinator plan` lists every term",
            worst.role,
            HumanBytes(need),
            HumanBytes(capacity.bytes),
            capacity.source,
            big.name,
            HumanBytes(big.bytes),
            big.detail,
        ))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model {}: {} parameters; {} worker(s) on {}",
            self.model.display(),
            self.parameters,
            self.world_size,
            self.device
        )?;
        for w in &self.workers {
            writeln!(f, "\n{}:", w.role)?;
            for t in &w.terms {
                let place = if t.place == Place::Host && self.device == "cuda" {
                    " [host]"
                } else {
                    ""
                };
                writeln!(
                    f,
                    "  {:<20} {:>12}  {}{place}",
                    t.name,
                    HumanBytes(t.bytes).to_string(),
                    t.detail
                )?;
            }
            writeln!(
                f,
                "  {:<20} {:>12}  libtorch and the process before the model",
                "runtime",
                HumanBytes(w.runtime_bytes).to_string()
            )?;
            writeln!(
                f,
                "  {:<20} {:>12}",
                "peak",
                HumanBytes(w.device_bytes()).to_string()
            )?;
        }
        match &self.capacity {
            Some(c) => {
                let verdict = match self.check() {
                    Ok(()) => "fits".to_string(),
                    Err(e) => e,
                };
                write!(
                    f,
                    "\navailable per worker: {} ({}): {verdict}",
                    HumanBytes(c.bytes),
                    c.source
                )
            }
            None => write!(
                f,
                "\nmemory per worker unknown here: pass --device-memory (e.g. 80GiB) to check the fit"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
