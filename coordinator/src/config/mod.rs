//! cluster.yaml: the schema, and `load()` that turns a file into a validated [`JobConfig`].
//!
//! Every problem is reported as `file:line:column: field: what is wrong`, with a hint saying what
//! to do. Semantic checks (world_size 0, a path that does not exist) keep the location of the value
//! through `Spanned`, so they point at the same place a YAML error would.

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    job: JobSection,
    cluster: ClusterSection,
    model: ModelSection,
    data: DataSection,
    training: TrainingSection,
    checkpoint: CheckpointSection,
    #[serde(default)]
    observe: Option<ObserveSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSection {
    name: String,
    #[serde(default)]
    seed: u64,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelInit {
    /// Load model.safetensors from the model directory.
    Pretrained,
    /// Seeded random initialisation (config.json only); for smoke tests and from-scratch runs.
    Random,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    path: Spanned<String>,
    #[serde(default = "defaults::init")]
    init: ModelInit,
    #[serde(default)]
    activation_checkpointing: bool,
    #[serde(default)]
    precision: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainingSection {
    steps: Spanned<u64>,
    micro_batch_size: Spanned<u32>,
    #[serde(default = "defaults::one")]
    grad_accum_steps: Spanned<u32>,
    lr: Spanned<f64>,
    #[serde(default)]
    min_lr: Option<Spanned<f64>>,
    #[serde(default)]
    warmup_steps: u64,
    #[serde(default = "defaults::weight_decay")]
    weight_decay: Spanned<f64>,
    #[serde(default = "defaults::betas")]
    betas: Spanned<(f64, f64)>,
    #[serde(default = "defaults::eps")]
    eps: Spanned<f64>,
    #[serde(default = "defaults::grad_clip")]
    grad_clip: Spanned<f64>,
    #[serde(default = "defaults::one")]
    log_every_steps: Spanned<u32>,
    #[serde(default)]
    zero_stage: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointSection {
    dir: Spanned<String>,
    #[serde(default)]
    every_steps: u64,
    #[serde(default = "defaults::keep")]
    keep: Spanned<u32>,
    #[serde(default)]
    dtype: Option<Spanned<String>>,
    #[serde(default)]
    max_shard_size: Option<Spanned<String>>,
    #[serde(default = "defaults::lease_timeout_s")]
    lease_timeout_s: Spanned<u32>,
}

mod defaults {
    use super::{ModelInit, Spanned};
    use serde_saphyr::Location;

    fn unspanned<T>(value: T) -> Spanned<T> {
        Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
    }
    pub fn init() -> ModelInit {
        ModelInit::Pretrained
    }
    pub fn eval_max_sequences() -> u32 {
        512
    }
    pub fn eval_samples() -> u32 {
        5
    }
    pub fn weight() -> Spanned<f64> {
        unspanned(1.0)
    }
    pub fn one() -> Spanned<u32> {
        unspanned(1)
    }
    pub fn weight_decay() -> Spanned<f64> {
        unspanned(0.0)
    }
    pub fn betas() -> Spanned<(f64, f64)> {
        unspanned((0.9, 0.999))
    }
    pub fn eps() -> Spanned<f64> {
        unspanned(1e-8)
    }
    pub fn grad_clip() -> Spanned<f64> {
        unspanned(1.0)
    }
    pub fn keep() -> Spanned<u32> {
        unspanned(2)
    }
    pub fn lease_timeout_s() -> Spanned<u32> {
        unspanned(30)
    }
}

/// The committed checkpoint a job continues from (chosen and checked by `crate::resume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub dir: PathBuf,
    /// Optimizer steps already taken: training continues with step + 1.
    pub step: u64,
    /// The training caches the checkpoint was trained on (empty in older checkpoints).
    pub datasets: Vec<String>,
}

/// A validated job: every path absolute and checked, every number in range.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub source: PathBuf,
    pub name: String,
    pub seed: u64,
    pub cluster: ClusterConfig,
    pub model_path: PathBuf,
    pub model_init: ModelInit,
    pub data: DataConfig,
    pub steps: u64,
    pub micro_batch_size: u32,
    pub grad_accum_steps: u32,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub grad_clip: f64,
    pub log_every_steps: u32,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_every_steps: u64,
    pub checkpoint_keep: u32,
    /// Canonical Hugging Face dtype name; None keeps the base model's.
    pub checkpoint_dtype: Option<String>,
    pub checkpoint_max_shard_bytes: u64,
    /// A coordinator's lease on checkpoint_dir may be taken over once it has not been renewed
    /// for this long (its owner crashed).
    pub checkpoint_lease_timeout: std::time::Duration,
    pub activation_checkpointing: bool,
    /// "fp32", or "bf16": bf16 compute weights with fp32 master weights and optimizer state.
    pub precision: String,
    /// 0: every rank keeps the whole optimizer state; 1: each keeps its 1/world_size shard of
    /// the AdamW moments; 2: gradients are reduce-scattered as well (worker/src/zero/).
    pub zero_stage: u32,
    /// Set by `launch --resume`, not by cluster.yaml: the committed checkpoint to continue.
    pub resume: Option<Resume>,
    /// The resume was chosen by `cluster.resume: auto` (a restarted coordinator): the job's
    /// restart count carries over. A person's `--resume` or a fresh start begins at zero.
    pub resume_keeps_restarts: bool,
    pub observe: ObserveConfig,
}

/// Reads and validates a cluster.yaml. Relative paths in it are relative to the file's directory.
/// What a config is loaded for. `validate` usually runs where the job will not (a Slurm login
/// node), so there `world_size: auto` without SLURM_NTASKS / FERROTUNE_WORLD_SIZE is left for
/// `launch` to resolve instead of being an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Launch,
    Validate,
}

pub fn load(path: &Path, purpose: Purpose) -> Result<JobConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    let env = |name: &str| std::env::var(name).ok();
    let mut config =
        parse_for(&text, &base, &env, purpose).map_err(|issues| ConfigError::Invalid {
            file: path.to_path_buf(),
            issues,
        })?;
    config.source = path.to_path_buf();
    Ok(config)
}

/// Parses and validates config text; `base` resolves relative paths. `world_size: auto` reads
/// this process's environment.
pub fn parse(text: &str, base: &Path) -> Result<JobConfig, Vec<Issue>> {
    parse_with_env(text, base, &|name| std::env::var(name).ok())
}

/// [`parse`] with the environment given as a lookup function.
pub fn parse_with_env(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<JobConfig, Vec<Issue>> {
    parse_for(text, base, env, Purpose::Launch)
}

fn parse_for(
    text: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    purpose: Purpose,
) -> Result<JobConfig, Vec<Issue>> {
    let file: ClusterFile = serde_saphyr::from_str(text).map_err(|e| vec![yaml_issue(&e, text)])?;
    let mut checks = Checks {
        issues: Vec::new(),
        base,
        purpose,
    };
    let config = checks.validate(file, env);
    if checks.issues.is_empty() {
        Ok(config)
    } else {
        Err(checks.issues)
    }
}

struct Checks<'a> {
    issues: Vec<Issue>,
    base: &'a Path,
    purpose: Purpose,
}

impl Checks<'_> {
    fn push<T>(&mut self, at: &Spanned<T>, field: &str, message: String, hint: &str) {
        self.issues.push(Issue {
            line: at.referenced.line() as u32,
            column: at.referenced.column() as u32,
            field: field.to_string(),
            message,
            hint: Some(hint.to_string()),
        });
    }

    fn positive_u32(&mut self, v: &Spanned<u32>, field: &str) -> u32 {
        if v.value == 0 {
            self.push(
                v,
                field,
                "must be at least 1, got 0".into(),
                "set a positive whole number",
            );
        }
        v.value
    }

    fn finite_at_least(&mut self, v: &Spanned<f64>, field: &str, min: f64, strict: bool) -> f64 {
        let ok = v.value.is_finite()
            && if strict {
                v.value > min
            } else {
                v.value >= min
            };
        if !ok {
            let relation = if strict { "greater than" } else { "at least" };
            self.push(
                v,
                field,
                format!("must be a number {relation} {min}, got {}", v.value),
                "fix the value",
            );
        }
        v.value
    }

    fn seconds(&mut self, v: &Spanned<f64>, field: &str) -> Duration {
        let s = self.finite_at_least(v, field, 0.0, true);
        Duration::from_secs_f64(if s.is_finite() && s > 0.0 { s } else { 1.0 })
    }

    fn resolve(&self, raw: &str) -> PathBuf {
        let p = Path::new(raw);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn existing(&mut self, v: &Spanned<String>, field: &str, want_dir: bool) -> PathBuf {
        let path = self.resolve(&v.value);
        let kind = if want_dir { "directory" } else { "file" };
        let ok = if want_dir {
            path.is_dir()
        } else {
            path.is_file()
        };
        if !ok {
            let message = if path.exists() {
                format!("{} is not a {kind}", path.display())
            } else {
                format!("{} does not exist", path.display())
            };
            self.push(
                v,
                field,
                message,
                &format!("point it at an existing {kind}; relative paths start at the directory of the config file"),
            );
        }
        path
    }

    fn validate(&mut self, f: ClusterFile, env: &dyn Fn(&str) -> Option<String>) -> JobConfig {
        let cluster = self.cluster(&f.cluster, env);
        let model_path = self.existing(&f.model.path, "model.path", true);
        if model_path.is_dir() {
            let has = |name: &str| model_path.join(name).is_file();
            let mut missing = Vec::new();
            if !has("config.json") {
                missing.push("config.json");
            }
            let has_weights = has("model.safetensors") || has("model.safetensors.index.json");
            if f.model.init == ModelInit::Pretrained && !has_weights {
                missing.push("model.safetensors (or model.safetensors.index.json and its shards)");
            }
            for name in missing {
                {
                    self.push(
                        &f.model.path,
                        "model.path",
                        format!("{} has no {name}", model_path.display()),
                        "point model.path at a Hugging Face model directory (config.json, model.safetensors, tokenizer.json), or set model.init: random to start from random weights",
                    );
                }
            }
            if !model_path.join("tokenizer.json").is_file() {
                self.push(
                    &f.model.path,
                    "model.path",
                    format!("{} has no tokenizer.json", model_path.display()),
                    "copy the base model's tokenizer.json into the model directory",
                );
            }
        }

        let t = &f.training;
        if t.steps.value == 0 {
            self.push(
                &t.steps,
                "training.steps",
                "must be at least 1, got 0".into(),
                "set how many optimizer steps to run",
            );
        }
        let micro_batch_size = self.positive_u32(&t.micro_batch_size, "training.micro_batch_size");
        let grad_accum_steps = self.positive_u32(&t.grad_accum_steps, "training.grad_accum_steps");
        let log_every_steps = self.positive_u32(&t.log_every_steps, "training.log_every_steps");
        let lr = self.finite_at_least(&t.lr, "training.lr", 0.0, true);
        let min_lr = match &t.min_lr {
            Some(m) => {
                let v = self.finite_at_least(m, "training.min_lr", 0.0, false);
                if v > lr {
                    self.push(
                        m,
                        "training.min_lr",
                        format!("must not exceed training.lr ({lr})"),
                        "the cosine schedule decays from lr down to min_lr",
                    );
                }
                v
            }
            None => lr * 0.1,
        };
        let weight_decay =
            self.finite_at_least(&t.weight_decay, "training.weight_decay", 0.0, false);
        let (b1, b2) = t.betas.value;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            self.push(
                &t.betas,
                "training.betas",
                format!("both betas must be in [0, 1), got [{b1}, {b2}]"),
                "typical values are [0.9, 0.95] or [0.9, 0.999]",
            );
        }
        let eps = self.finite_at_least(&t.eps, "training.eps", 0.0, true);
        let grad_clip = self.finite_at_least(&t.grad_clip, "training.grad_clip", 0.0, false);
        let zero_stage = match &t.zero_stage {
            None => 0,
            Some(z) if z.value <= 2 => z.value,
            Some(z) => {
                self.push(
                    z,
                    "training.zero_stage",
                    format!("zero_stage must be 0, 1 or 2, got {}", z.value),
                    "0 keeps the whole optimizer state on every rank; 1 shards the AdamW moments across ranks; 2 also reduce-scatters the gradients",
                );
                0
            }
        };

        let checkpoint_keep = self.positive_u32(&f.checkpoint.keep, "checkpoint.keep");
        let lease_timeout_s =
            self.positive_u32(&f.checkpoint.lease_timeout_s, "checkpoint.lease_timeout_s");
        let checkpoint_dir = self.resolve(&f.checkpoint.dir.value);
        if checkpoint_dir.is_file() {
            self.push(
                &f.checkpoint.dir,
                "checkpoint.dir",
                format!("{} is a file", checkpoint_dir.display()),
                "point checkpoint.dir at a directory (it is created if missing)",
            );
        }

        let data = self.data(&f.data, &checkpoint_dir);
        let precision = match &f.model.precision {
            None => "fp32".to_string(),
            Some(p) => match p.value.as_str() {
                "fp32" | "float32" => "fp32".to_string(),
                "bf16" | "bfloat16" => "bf16".to_string(),
                other => {
                    self.push(
                        p,
                        "model.precision",
                        format!("unknown precision `{other}`"),
                        "use fp32, or bf16 (bf16 compute weights with fp32 master weights)",
                    );
                    "fp32".to_string()
                }
            },
        };

        let checkpoint_dtype = f.checkpoint.dtype.as_ref().and_then(|d| {
            let canonical = match d.value.as_str() {
                "float32" | "fp32" => Some("float32"),
                "bfloat16" | "bf16" => Some("bfloat16"),
                "float16" | "fp16" => Some("float16"),
                _ => None,
            };
            if canonical.is_none() {
                self.push(
                    d,
                    "checkpoint.dtype",
                    format!("unknown dtype `{}`", d.value),
                    "use float32, bfloat16 or float16 (or leave it out to keep the base model's)",
                );
            }
            canonical.map(String::from)
        });
        let checkpoint_max_shard_bytes = match &f.checkpoint.max_shard_size {
            None => 5_000_000_000,
            Some(s) => match parse_size(&s.value) {
                Some(bytes) if bytes > 0 => bytes,
                _ => {
                    self.push(
                        s,
                        "checkpoint.max_shard_size",
                        format!("cannot read `{}` as a size", s.value),
                        "write it like transformers does: 5GB, 500MB, 2GiB, or a byte count",
                    );
                    1
                }
            },
        };

        let observe = self.observe(f.observe.as_ref());
        JobConfig {
            source: PathBuf::new(),
            name: f.job.name,
            seed: f.job.seed,
            cluster,
            model_path,
            model_init: f.model.init,
            data,
            steps: t.steps.value,
            micro_batch_size,
            grad_accum_steps,
            lr,
            min_lr,
            warmup_steps: t.warmup_steps,
            weight_decay,
            betas: (b1, b2),
            eps,
            grad_clip,
            log_every_steps,
            checkpoint_dir,
            checkpoint_every_steps: f.checkpoint.every_steps,
            checkpoint_keep,
            checkpoint_lease_timeout: std::time::Duration::from_secs(u64::from(lease_timeout_s)),
            checkpoint_dtype,
            checkpoint_max_shard_bytes,
            activation_checkpointing: f.model.activation_checkpointing,
            precision,
            zero_stage,
            resume: None,
            resume_keeps_restarts: false,
            observe,
        }
    }
}

/// A size as transformers writes `max_shard_size`: "5GB" (decimal), "2GiB" (binary), "500MB",
/// "100KB" or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * scale) as u64)
}

mod cluster;
mod data;
mod devices;
mod issues;
mod observe;
use cluster::ClusterSection;
pub use cluster::{ClusterConfig, LauncherKind, ResumeSetting, WORLD_SIZE_ENVS};
use data::DataSection;
pub use data::{DataConfig, DatasetConfig};
pub use devices::{CollectiveSetting, DeviceConfig, DeviceSetting};
use issues::yaml_issue;
pub use issues::{ConfigError, Issue};
pub use observe::ObserveConfig;
use observe::ObserveSection;

#[cfg(test)]
pub(crate) mod tests;
