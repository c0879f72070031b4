//! Shared storage, checked before training: model, data, caches and checkpoint.dir are paths the
//! coordinator resolved on its host, and every worker must see them at the same path. A host
//! that cannot is named together with the path, instead of failing later as "rank 1 failed".

use crate::spec::TrainSpec;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("host {host} cannot read {field} {}: {why}; model, data and checkpoint.dir must be on storage that every host mounts at the same path", path.display())]
pub struct StorageError {
    pub host: String,
    pub field: String,
    pub path: PathBuf,
    pub why: String,
}

/// Every path of `spec` this worker reads, checked for what it will do with it.
pub fn check(spec: &TrainSpec, resume_from: Option<&Path>, host: &str) -> Result<(), StorageError> {
    let fail = |field: &str, path: &Path, why: String| StorageError {
        host: host.to_string(),
        field: field.to_string(),
        path: path.to_path_buf(),
        why,
    };
    let dir = |field: &str, path: &Path| -> Result<(), StorageError> {
        std::fs::read_dir(path)
            .map(drop)
            .map_err(|e| fail(field, path, e.to_string()))
    };
    let file = |field: &str, path: &Path| -> Result<(), StorageError> {
        std::fs::File::open(path)
            .map(drop)
            .map_err(|e| fail(field, path, e.to_string()))
    };
    dir("model.path", &spec.model_path)?;
    file("model.path", &spec.model_path.join("config.json"))?;
    for d in &spec.datasets {
        file(&format!("dataset {}", d.name), &d.path)?;
        if let Some(eval) = &d.eval_path {
            file(&format!("dataset {} eval", d.name), eval)?;
        }
    }
    dir("data.cache_dir", &spec.cache_dir)?;
    dir("checkpoint.dir", &spec.checkpoint_dir)?;
    if let Some(resume) = resume_from {
        dir("the checkpoint to resume from", resume)?;
    }
    Ok(())
}
