//! The checkpoint format, both ways: writing a rank's part into a staging directory under the
//! checkpoint root (the coordinator commits it: manifest, rename; nothing here ever writes a
//! final name; at ZeRO stages 1 and 2 every rank stages its own part and the coordinator merges
//! the parts), and restoring from a committed one what "resume is exact" needs beyond the
//! Hugging Face weights: fp32 masters when the model files are narrower, AdamW moments and step
//! count, the step and the data cursor.
//!
//! Layout (Hugging Face first, so `from_pretrained(dir)` works on it directly):
//!   config.json, model*.safetensors (+ index), tokenizer files   the fine-tuned model
//!   training_state/optimizer.safetensors                AdamW exp_avg / exp_avg_sq per parameter
//!   training_state/optimizer-rank-XXXXX-of-YYYYY.safetensors   instead, at ZeRO stages 1 and 2:
//!                                                       each rank's range of the flat moments
//!                                                       (shard map in trainer_state.json)
//!   training_state/trainer_state.json                   step, data cursor, schedule, seed
//!   training_state/master_weights.safetensors           fp32 weights, when the model files are
//!                                                       saved in a narrower dtype (exact resume)

use crate::model::io::{LoadedModel, ModelFiles, SaveOptions};
use crate::model::DType;
use crate::optim::OptimizerState;
use ferrotune_data::manifest::{digest_tree, FileDigest, Manifest};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

mod optimizer;

pub use ferrotune_data::trainer_state::{TrainerState, STATE_FILE, TRAINING_STATE};
pub use optimizer::{check_shard_map, load_per_parameter, load_shard, restore_optimizer};
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MASTERS_FILE: &str = "master_weights.safetensors";

/// Everything a checkpoint writes, copied out of the training state at one step: the weights,
/// the AdamW moments, the trainer state and the chat template the job used (recorded in
/// tokenizer_config.json when it is not the model's own). The copy is what lets training go on
/// while a background thread writes it.
pub struct Snapshot {
    /// The model files: the writer rank's part only.
    pub model: Option<ModelFiles>,
    pub optimizer: Vec<(String, Tensor)>,
    /// Where the optimizer state goes under training_state/.
    pub optimizer_file: String,
    pub state: TrainerState,
    pub chat_template: Option<String>,
}

/// The memory of a written snapshot, handed back by the writer so that the next snapshot
/// copies into it: gigabytes freshly allocated at every checkpoint cost page faults (the
/// kernel zeroing every page) that a reused buffer does not, and those were most of the stall.
pub struct Buffers {
    params: Option<Vec<(String, Tensor)>>,
    optimizer: Vec<(String, Tensor)>,
}

impl Buffers {
    /// Memory for a snapshot of this model (None: a rank that writes only its optimizer part)
    /// and optimizer, touched now: allocated while the job loads rather than at its first
    /// checkpoint.
    pub fn like(model: Option<&LoadedModel>, optimizer: &dyn OptimizerState) -> Buffers {
        Buffers {
            params: model.map(|m| copy_into(weights_of(m, optimizer), None)),
            optimizer: copy_into(optimizer.state_tensors(), None),
        }
    }
}

impl Snapshot {
    /// Copies the training state, into `reuse` where it has the same tensors. `model`: the
    /// writer rank's; None on a rank that stages only its part of a sharded optimizer.
    pub fn take(
        model: Option<&LoadedModel>,
        optimizer: &dyn OptimizerState,
        state: TrainerState,
        chat_template: Option<&str>,
        reuse: Option<Buffers>,
    ) -> Snapshot {
        let (params, moments) = match reuse {
            Some(b) => (b.params, Some(b.optimizer)),
            None => (None, None),
        };
        let model = model.map(|m| ModelFiles {
            config: m.config.clone(),
            params: copy_into(weights_of(m, optimizer), params),
        });
        let optimizer_file = match optimizer.shards() {
            Some((rank, map)) => map.files[rank].file.clone(),
            None => OPTIMIZER_FILE.into(),
        };
        Snapshot {
            model,
            optimizer: copy_into(optimizer.state_tensors(), moments),
            optimizer_file,
            state,
            chat_template: chat_template.map(String::from),
        }
    }

    fn into_buffers(self) -> Buffers {
        Buffers {
            params: self.model.map(|m| m.params),
            optimizer: self.optimizer,
        }
    }
}

/// The fp32 weights a checkpoint saves: the model's, or the masters a sharded optimizer
/// gathered (under bf16 no rank keeps the whole masters in the model).
fn weights_of(model: &LoadedModel, optimizer: &dyn OptimizerState) -> Vec<(String, Tensor)> {
    optimizer
        .master_weights()
        .unwrap_or_else(|| model.named_parameters())
}

/// Copies of `live`, written into `reuse` when it holds the same names and shapes.
fn copy_into(
    live: Vec<(String, Tensor)>,
    reuse: Option<Vec<(String, Tensor)>>,
) -> Vec<(String, Tensor)> {
    let fits = |r: &Vec<(String, Tensor)>| {
        r.len() == live.len()
            && r.iter().zip(&live).all(|((rn, rt), (ln, lt))| {
                rn == ln && rt.size() == lt.size() && rt.kind() == lt.kind()
            })
    };
    let reuse = reuse.filter(fits);
    tch::no_grad(|| match reuse {
        Some(mut buffers) => {
            for ((_, dst), (_, src)) in buffers.iter_mut().zip(&live) {
                dst.copy_(src);
            }
            buffers
        }
        // Into host memory whatever the device: a GPU worker's snapshot must not double its
        // GPU memory, and the writer thread reads it from the host.
        None => live
            .into_iter()
            .map(|(n, t)| {
                let mut host = crate::device::host_buffer_like(&t);
                host.copy_(&t);
                (n, host)
            })
            .collect(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tensor(String),
    #[error("cannot start the checkpoint writer: {0}")]
    Spawn(std::io::Error),
    #[error("the checkpoint writer panicked")]
    Panicked,
}

/// A committed checkpoint that cannot be continued from.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A file does not match the manifest: the checkpoint is set aside, the one before taken.
    #[error("resume: {message}")]
    Damaged { file: PathBuf, message: String },
    #[error("resume: {0}")]
    Unreadable(String),
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn write_tensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<(), CheckpointError> {
    let named: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&named, path)
        .map_err(|e| CheckpointError::Tensor(format!("{}: {e}", path.display())))?;
    sync_file(path)
}

fn shallow(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

fn sync_file(path: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", path))
}

/// Puts the template the job trained with into the checkpoint's tokenizer_config.json, so that
/// transformers' apply_chat_template and vLLM format prompts as in training.
fn record_chat_template(dir: &Path, template: &str) -> Result<(), CheckpointError> {
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            CheckpointError::Tensor(format!("{}: invalid JSON: {e}", path.display()))
        })?,
        Err(_) => serde_json::json!({}),
    };
    if let Some(o) = config.as_object_mut() {
        o.insert("chat_template".into(), template.into());
    }
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    std::fs::write(&path, text).map_err(io("write", &path))?;
    sync_file(&path)
}

/// Writes this rank's part into `<root>/.staging-<step>-r<rank>-<pid>` and returns that path:
/// everything on the writer rank; only its optimizer file on a rank of a sharded optimizer.
pub fn write_staging(
    root: &Path,
    rank: usize,
    snapshot: &Snapshot,
    model_src: &Path,
    save: &SaveOptions,
) -> Result<PathBuf, CheckpointError> {
    let state = &snapshot.state;
    std::fs::create_dir_all(root).map_err(io("create", root))?;
    let staging = root.join(format!(
        ".staging-{:08}-r{rank}-{}",
        state.step,
        std::process::id()
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io("clear", &staging))?;
    }
    let training_state = staging.join(TRAINING_STATE);
    std::fs::create_dir_all(&training_state).map_err(io("create", &training_state))?;

    write_tensors(
        &training_state.join(&snapshot.optimizer_file),
        shallow(&snapshot.optimizer),
    )?;
    let Some(model) = &snapshot.model else {
        return Ok(staging);
    };
    let written = model
        .save_pretrained(&staging, model_src, save)
        .map_err(|e| CheckpointError::Tensor(e.to_string()))?;
    for file in &written {
        sync_file(file)?;
    }
    if let Some(template) = &snapshot.chat_template {
        record_chat_template(&staging, template)?;
    }
    if save.dtype != DType::F32 {
        // The model files hold rounded weights; resuming from them would not be exact.
        write_tensors(&training_state.join(MASTERS_FILE), shallow(&model.params))?;
    }
    let state_path = training_state.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).expect("trainer state serialises");
    std::fs::write(&state_path, json).map_err(io("write", &state_path))?;
    sync_file(&state_path)?;
    Ok(staging)
}

/// A checkpoint written to its staging directory, ready to commit.
#[derive(Debug)]
pub struct Staged {
    pub step: u64,
    pub is_final: bool,
    /// How many ranks stage a part of this checkpoint (1: this directory is all of it).
    pub parts: u32,
    pub dir: PathBuf,
    /// Size and SHA-256 of every file, for the manifest.
    pub files: Vec<FileDigest>,
    /// How long the training thread was held up for it (snapshot, and waiting for the write
    /// before it).
    pub stall_seconds: f64,
    /// How long the background write took (files, syncs, digests).
    pub write_seconds: f64,
}

/// One checkpoint to write in the background.
pub struct WriteJob {
    pub root: PathBuf,
    pub rank: usize,
    pub snapshot: Snapshot,
    pub model_src: PathBuf,
    pub save: SaveOptions,
    pub is_final: bool,
    pub parts: u32,
    pub stall_seconds: f64,
}

/// Tests make the write slow with this, to see training go on meanwhile.
const TEST_DELAY_ENV: &str = "FERROTUNE_TEST_CHECKPOINT_DELAY_MS";

/// Writes checkpoints on a background thread, one at a time: the training thread hands over a
/// snapshot and goes on; the next checkpoint waits only if this one is still being written.
/// Dropping the writer waits for the write in flight (a half-written staging directory is
/// never a checkpoint, but a finished one is worth keeping for the commit).
/// What the writer thread hands back: the staged checkpoint (or why not), and the snapshot's
/// memory for the next one.
type Written = (Result<Staged, CheckpointError>, Option<Buffers>);

#[derive(Default)]
pub struct Writer {
    running: Option<std::thread::JoinHandle<Written>>,
    /// The last written snapshot's memory, for the next one.
    spare: Option<Buffers>,
}

impl Writer {
    /// Starts writing `job` (the caller has waited for the previous write).
    pub fn start(&mut self, job: WriteJob) -> Result<(), CheckpointError> {
        assert!(self.running.is_none(), "wait for the previous write first");
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || write(job))
            .map_err(CheckpointError::Spawn)?;
        self.running = Some(handle);
        Ok(())
    }

    /// The write in flight, if it has finished; never blocks.
    pub fn finished(&mut self) -> Option<Result<Staged, CheckpointError>> {
        if self.running.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait()
        } else {
            None
        }
    }

    /// Waits for the write in flight, if there is one.
    pub fn wait(&mut self) -> Option<Result<Staged, CheckpointError>> {
        let handle = self.running.take()?;
        let (result, buffers) = handle
            .join()
            .unwrap_or_else(|_| (Err(CheckpointError::Panicked), None));
        self.spare = buffers;
        Some(result)
    }

    /// Memory for the first snapshot (see [`Buffers::like`]).
    pub fn prepare(&mut self, buffers: Buffers) {
        self.spare = Some(buffers);
    }

    /// The memory of the last written snapshot, to copy the next one into.
    pub fn take_spare(&mut self) -> Option<Buffers> {
        self.spare.take()
    }
}

impl Drop for Writer {
    /// A write still running is waited for; one that finished but was never committed (its
    /// generation ended) is removed, so that no staging directory is left behind.
    fn drop(&mut self) {
        if let Some(Ok(staged)) = self.wait() {
            let _ = std::fs::remove_dir_all(&staged.dir);
        }
    }
}

fn write(job: WriteJob) -> Written {
    let WriteJob {
        root,
        rank,
        snapshot,
        model_src,
        save,
        is_final,
        parts,
        stall_seconds,
    } = job;
    let started = std::time::Instant::now();
    let step = snapshot.state.step;
    let written = write_staging(&root, rank, &snapshot, &model_src, &save);
    (
        written.and_then(|dir| finish_write(dir, (step, is_final, parts), stall_seconds, started)),
        Some(snapshot.into_buffers()),
    )
}

/// Digests what was staged and says how long the write took.
fn finish_write(
    dir: PathBuf,
    (step, is_final, parts): (u64, bool, u32),
    stall_seconds: f64,
    started: std::time::Instant,
) -> Result<Staged, CheckpointError> {
    crate::fault::point_at(crate::fault::Point::CheckpointWrite, step);
    // The writer digests what it wrote (while it is in the page cache): the coordinator then
    // commits without reading a byte of it, and every later load can verify it.
    let files = digest_tree(&dir).map_err(|e| CheckpointError::Tensor(e.to_string()))?;
    if let Some(ms) = std::env::var(TEST_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    Ok(Staged {
        step,
        is_final,
        parts,
        dir,
        files,
        stall_seconds,
        write_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Checks every file of the checkpoint against its manifest (size and SHA-256, files hashed in
/// parallel) before anything is loaded from it: a damaged checkpoint is refused naming the file,
/// never trained on. The reads also bring the files into the page cache the loader reads next.
pub fn verify(dir: &Path) -> Result<(), RestoreError> {
    let started = std::time::Instant::now();
    let manifest = Manifest::read(dir).map_err(|e| RestoreError::Unreadable(e.to_string()))?;
    manifest.verify(dir).map_err(|e| RestoreError::Damaged {
        file: e.path().to_path_buf(),
        message: e.to_string(),
    })?;
    tracing::info!(
        checkpoint = %dir.display(),
        files = manifest.files.len(),
        seconds = started.elapsed().as_secs_f64(),
        "checkpoint verified against its manifest"
    );
    Ok(())
}

/// Restores from `dir` what the freshly loaded `model` (a checkpoint is a Hugging Face model
/// directory, loaded by the ordinary loader) lacks: the fp32 masters, when the model files are
/// narrower. Returns the saved trainer state, whose cursor the mixture continues from in O(1).
/// Before anything is built on the weights (compute copy, optimizer shards).
pub fn restore_weights(dir: &Path, model: &LoadedModel) -> Result<TrainerState, RestoreError> {
    let unreadable = |e: &dyn std::fmt::Display| RestoreError::Unreadable(e.to_string());
    let state = TrainerState::read(dir).map_err(|e| unreadable(&e))?;
    let masters = dir.join(TRAINING_STATE).join(MASTERS_FILE);
    if masters.is_file() {
        model.overwrite_from(&masters).map_err(|e| unreadable(&e))?;
    } else if let Some(narrow) = model.config.dtype.filter(|d| *d != DType::F32) {
        tracing::warn!(
            "{} holds {narrow:?} weights and no fp32 master weights: training continues from the rounded weights, not exactly where it stopped",
            dir.display()
        );
    }
    Ok(state)
}
