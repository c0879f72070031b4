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
    /// The ZeRO stage that wrote it (informational: any stage and world size resumes from any
    /// checkpoint).
    #[serde(default)]
    pub zero_stage: u8,
    /// How the AdamW moments are saved at ZeRO stages 1 and 2: one file per rank, each a range
    /// of the flattened parameters. None: per parameter, in `optimizer.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_shards: Option<OptimizerShards>,
    /// data.chat_template_kwargs the job trained with: Hugging Face has no field for them, so
    /// `worker generate --chat` takes them from here (other tools must be given them).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// The shard map of an optimizer saved per rank: every parameter's moments flattened and
/// concatenated in `parameters` order, and which file holds which range of that vector. Each
/// file holds two 1-D fp32 tensors, `exp_avg` and `exp_avg_sq`, of `end - start` elements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerShards {
    pub parameters: Vec<FlatParameter>,
    pub files: Vec<ShardFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatParameter {
    pub name: String,
    pub shape: Vec<i64>,
    /// Where its first element is in the flat vector.
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardFile {
    /// Relative to `training_state/`.
    pub file: String,
    pub start: u64,
    pub end: u64,
}

/// The name of rank `rank`'s optimizer file among `world` (`optimizer-rank-00001-of-00008`).
pub fn optimizer_shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank-{rank:05}-of-{world:05}.safetensors")
}

impl OptimizerShards {
    /// Elements of the flat vector (every parameter's).
    pub fn total(&self) -> u64 {
        self.parameters
            .iter()
            .map(|p| p.shape.iter().product::<i64>().max(0) as u64)
            .sum()
    }

    /// Checks that the parameters are laid end to end from 0 and the files cover the flat
    /// vector exactly once, in order: then every element is restored from exactly one file.
    pub fn check(&self) -> Result<(), String> {
        let mut next = 0u64;
        for p in &self.parameters {
            if p.offset != next {
                return Err(format!(
                    "parameter `{}` starts at {}, expected {next}",
                    p.name, p.offset
                ));
            }
            next += p.shape.iter().product::<i64>().max(0) as u64;
        }
        let mut covered = 0u64;
        for f in &self.files {
            if f.start != covered || f.end < f.start {
                return Err(format!(
                    "{} holds [{}, {}), expected a range from {covered}",
                    f.file, f.start, f.end
                ));
            }
            covered = f.end;
        }
        if covered != next {
            return Err(format!(
                "the files hold {covered} elements, the parameters have {next}"
            ));
        }
        Ok(())
    }
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
