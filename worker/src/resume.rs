//! Continuing from a committed checkpoint: the weights come in through the ordinary loader (the
//! checkpoint is a Hugging Face model directory); this restores the rest of what the invariant
//! "resume is exact" needs: fp32 master weights when the model files are narrower, AdamW moments
//! and step count, the step, and the data cursor (the mixture skips to it in O(1)).

use crate::checkpoint::{TrainerState, MASTERS_FILE, OPTIMIZER_FILE, TRAINING_STATE};
use crate::model::io::LoadedModel;
use crate::model::DType;
use crate::optim::AdamW;
use crate::train::TrainError;
use ferrotune_data::manifest::Manifest;
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// Checks every file of the checkpoint against its manifest (size and SHA-256, files hashed in
/// parallel) before anything is loaded from it: a damaged checkpoint is refused naming the file,
/// never trained on. The reads also bring the files into the page cache the loader reads next.
pub fn verify(dir: &Path) -> Result<(), TrainError> {
    let started = std::time::Instant::now();
    let manifest =
        Manifest::read(dir).map_err(|e| TrainError::Checkpoint(format!("resume: {e}")))?;
    manifest
        .verify(dir)
        .map_err(|e| TrainError::DamagedCheckpoint {
            file: e.path().to_path_buf(),
            message: format!("resume: {e}"),
        })?;
    tracing::info!(
        checkpoint = %dir.display(),
        files = manifest.files.len(),
        seconds = started.elapsed().as_secs_f64(),
        "checkpoint verified against its manifest"
    );
    Ok(())
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    Tensor::read_safetensors(path)
        .map(|v| v.into_iter().collect())
        .map_err(|e| TrainError::Checkpoint(format!("resume: {}: {e}", path.display())))
}

/// Restores masters and optimizer from `dir` into the freshly loaded `model` and `optimizer`;
/// returns the saved trainer state (step, data cursor).
pub fn restore(
    dir: &Path,
    model: &LoadedModel,
    optimizer: &mut AdamW,
) -> Result<TrainerState, TrainError> {
    let state_dir = dir.join(TRAINING_STATE);
    let state =
        TrainerState::read(dir).map_err(|e| TrainError::Checkpoint(format!("resume: {e}")))?;

    let masters = state_dir.join(MASTERS_FILE);
    if masters.is_file() {
        model
            .overwrite_from(&masters)
            .map_err(|e| TrainError::Checkpoint(format!("resume: {e}")))?;
    } else if let Some(narrow) = model.config.dtype.filter(|d| *d != DType::F32) {
        tracing::warn!(
            "{} holds {narrow:?} weights and no fp32 master weights: training continues from the rounded weights, not exactly where it stopped",
            dir.display()
        );
    }

    let opt_path = state_dir.join(OPTIMIZER_FILE);
    optimizer
        .load_state(read_tensors(&opt_path)?, state.optimizer_steps)
        .map_err(|e| TrainError::Checkpoint(format!("resume: {}: {e}", opt_path.display())))?;
    Ok(state)
}
