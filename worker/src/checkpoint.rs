//! Writing a rank's part of a checkpoint into a staging directory under the checkpoint root.
//! The coordinator commits it (manifest, rename); nothing here ever writes a final name.
//!
//! Layout (Hugging Face first, so `from_pretrained(dir)` works on it directly):
//!   config.json, model*.safetensors (+ index), tokenizer files   the fine-tuned model
//!   training_state/optimizer.safetensors                AdamW exp_avg / exp_avg_sq per parameter
//!   training_state/trainer_state.json                   step, data cursor, schedule, seed
//!   training_state/master_weights.safetensors           fp32 weights, when the model files are
//!                                                       saved in a narrower dtype (exact resume)

use crate::model::io::{LoadedModel, SaveOptions};
use crate::model::DType;
use crate::optim::AdamW;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub use ferrotune_data::trainer_state::{TrainerState, STATE_FILE, TRAINING_STATE};
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MASTERS_FILE: &str = "master_weights.safetensors";

/// What a checkpoint holds besides the model: training state, and the chat template the job
/// used (recorded in tokenizer_config.json when it is not the model's own).
pub struct TrainingState<'a> {
    pub optimizer: &'a AdamW,
    pub state: &'a TrainerState,
    pub chat_template: Option<&'a str>,
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

/// Writes everything into `<root>/.staging-<step>-r<rank>-<pid>` and returns that path.
pub fn write_staging(
    root: &Path,
    rank: usize,
    model: &LoadedModel,
    model_src: &Path,
    save: &SaveOptions,
    training: &TrainingState<'_>,
) -> Result<PathBuf, CheckpointError> {
    let (optimizer, state) = (training.optimizer, training.state);
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

    let written = model
        .save_pretrained(&staging, model_src, save)
        .map_err(|e| CheckpointError::Tensor(e.to_string()))?;
    for file in &written {
        sync_file(file)?;
    }
    if let Some(template) = training.chat_template {
        record_chat_template(&staging, template)?;
    }

    write_tensors(
        &training_state.join(OPTIMIZER_FILE),
        optimizer.state_tensors(),
    )?;
    if save.dtype != DType::F32 {
        // The model files hold rounded weights; resuming from them would not be exact.
        write_tensors(&training_state.join(MASTERS_FILE), model.named_parameters())?;
    }
    let state_path = training_state.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).expect("trainer state serialises");
    std::fs::write(&state_path, json).map_err(io("write", &state_path))?;
    sync_file(&state_path)?;
    Ok(staging)
}
