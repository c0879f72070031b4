//! Restoring the AdamW moments, whichever way they were saved: per parameter in
//! `optimizer.safetensors` (ZeRO stage 0), or per rank as ranges of the flattened parameters
//! (`optimizer-rank-XXXXX-of-YYYYY.safetensors`, stages 1 and 2, with the shard map in
//! trainer_state.json). Both come down to pieces of parameters handed to
//! [`OptimizerState::load_piece`], which keeps what falls into its own part: so any stage at any
//! world size resumes from any checkpoint, and a rank only reads (the files are mapped) the
//! ranges that overlap its chunk.

use super::{RestoreError, TrainerState, OPTIMIZER_FILE, TRAINING_STATE};
use crate::optim::OptimizerState;
use ferrotune_data::trainer_state::OptimizerShards;
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Restores the moments and step count of `state` from the checkpoint `dir` into `optimizer`.
pub fn restore_optimizer(
    dir: &Path,
    state: &TrainerState,
    optimizer: &mut dyn OptimizerState,
) -> Result<(), RestoreError> {
    let unreadable =
        |path: &Path, e: String| RestoreError::Unreadable(format!("{}: {e}", path.display()));
    let training_state = dir.join(TRAINING_STATE);
    match &state.optimizer_shards {
        None => {
            let path = training_state.join(OPTIMIZER_FILE);
            crate::model::io::with_mapped_tensors(&path, |saved| {
                load_per_parameter(optimizer, saved)
            })
            .map_err(|e| RestoreError::Unreadable(e.to_string()))?
            .map_err(|e| unreadable(&path, e))?;
        }
        Some(shards) => {
            let state_file = training_state.join(super::STATE_FILE);
            let index =
                check_shard_map(optimizer, shards).map_err(|e| unreadable(&state_file, e))?;
            for (i, file) in shards.files.iter().enumerate() {
                let path = training_state.join(&file.file);
                crate::model::io::with_mapped_tensors(&path, |saved| {
                    load_shard(optimizer, shards, &index, i, &saved)
                })
                .map_err(|e| RestoreError::Unreadable(e.to_string()))?
                .map_err(|e| unreadable(&path, e))?;
            }
        }
    }
    optimizer.set_step_count(state.optimizer_steps);
    Ok(())
}

/// Moments saved per parameter: every one must be there with its parameter's shape.
pub fn load_per_parameter(
    optimizer: &mut dyn OptimizerState,
    mut saved: HashMap<String, Tensor>,
) -> Result<(), String> {
    for (i, (name, shape)) in optimizer.parameter_shapes().into_iter().enumerate() {
        let mut take = |prefix: &str| {
            let key = format!("{prefix}.{name}");
            let t = saved
                .remove(&key)
                .ok_or_else(|| format!("`{key}` is missing"))?;
            if t.size() != shape || t.kind() != Kind::Float {
                return Err(format!(
                    "`{key}` is {:?} {:?}, the parameter Float {shape:?}",
                    t.kind(),
                    t.size()
                ));
            }
            Ok(t.reshape([-1]))
        };
        let (avg, avg_sq) = (take("exp_avg")?, take("exp_avg_sq")?);
        optimizer.load_piece(i, 0, &avg, &avg_sq);
    }
    if let Some(extra) = saved.keys().next() {
        return Err(format!("`{extra}` belongs to no parameter of this model"));
    }
    Ok(())
}

/// Checks the shard map against the optimizer's parameters (the same names with the same
/// shapes; the order may differ) and that its files cover every element once. Returns, per
/// parameter of the map, its index in the optimizer.
pub fn check_shard_map(
    optimizer: &dyn OptimizerState,
    shards: &OptimizerShards,
) -> Result<Vec<usize>, String> {
    shards
        .check()
        .map_err(|e| format!("optimizer shard map: {e}"))?;
    let mine: HashMap<String, (usize, Vec<i64>)> = optimizer
        .parameter_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| (name, (i, shape)))
        .collect();
    if mine.len() != shards.parameters.len() {
        return Err(format!(
            "the optimizer shard map has {} parameters, the model {}",
            shards.parameters.len(),
            mine.len()
        ));
    }
    shards
        .parameters
        .iter()
        .map(|p| match mine.get(&p.name) {
            Some((i, shape)) if *shape == p.shape => Ok(*i),
            Some((_, shape)) => Err(format!(
                "`{}` is {:?} in the optimizer shard map, {shape:?} in the model",
                p.name, p.shape
            )),
            None => Err(format!(
                "`{}` of the optimizer shard map is no parameter of this model",
                p.name
            )),
        })
        .collect()
}

/// Hands the pieces of every parameter that file `file` of the map holds to the optimizer.
/// `index`: the optimizer's index of each parameter of the map (from [`check_shard_map`]).
pub fn load_shard(
    optimizer: &mut dyn OptimizerState,
    shards: &OptimizerShards,
    index: &[usize],
    file: usize,
    saved: &HashMap<String, Tensor>,
) -> Result<(), String> {
    let f = &shards.files[file];
    let len = (f.end - f.start) as i64;
    let moment = |key: &str| {
        let t = saved
            .get(key)
            .ok_or_else(|| format!("`{key}` is missing"))?;
        if t.size() != [len] || t.kind() != Kind::Float {
            return Err(format!(
                "`{key}` is {:?} {:?}, the shard map says Float [{len}]",
                t.kind(),
                t.size()
            ));
        }
        Ok(t)
    };
    let (avg, avg_sq) = (moment("exp_avg")?, moment("exp_avg_sq")?);
    for (p, &i) in shards.parameters.iter().zip(index) {
        let numel = p.shape.iter().product::<i64>().max(0) as u64;
        let (a, b) = (p.offset.max(f.start), (p.offset + numel).min(f.end));
        if a < b {
            let at = (a - f.start) as i64;
            let n = (b - a) as i64;
            optimizer.load_piece(
                i,
                (a - p.offset) as i64,
                &avg.narrow(0, at, n),
                &avg_sq.narrow(0, at, n),
            );
        }
    }
    Ok(())
}
