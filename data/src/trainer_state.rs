//! `training_state/trainer_state.json`: where a checkpoint's run stands (step, data cursor,
//! schedule, the shape of the global batch). Written by the workers, read by the workers to
//! resume and by the coordinator to decide before any worker starts whether a resume can
//! continue exactly; one definition for both.

use crate::mixture::Cursor;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A trainer_state.json that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct StateFileError {
    pub path: PathBuf,
    pub message: String,
}

/// The directory of a checkpoint that holds everything beyond the Hugging Face model.
pub const TRAINING_STATE: &str = "training_state";
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    /// Where the data stream stands after `step`: resuming restores it in O(1).
    pub data_cursor: Cursor,
    pub seed: u64,
    pub world_size: usize,
    pub global_batch_sequences: usize,
    pub seq_len: usize,
    pub optimizer_steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Each dataset's training cache (`<name>-train-<key>`, the key hashing bytes and recipe): a
    /// resume can tell whether it reads the same data.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// The ZeRO stage that wrote it (informational: the optimizer state is saved per parameter
    /// at every stage, so any stage and world size resumes from it).
    #[serde(default)]
    pub zero_stage: u8,
}

impl TrainerState {
    /// Reads `<checkpoint>/training_state/trainer_state.json`; the error names the file.
    pub fn read(checkpoint: &Path) -> Result<TrainerState, StateFileError> {
        let path = checkpoint.join(TRAINING_STATE).join(STATE_FILE);
        std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .map_err(|message| StateFileError { path, message })
    }
}
