//! Committing checkpoints to shared storage.
//!
//! Ranks write into a staging directory (`.staging-*`) under the checkpoint root and report it.
//! The commit writes `manifest.json` (every file with its size and SHA-256), renames the staging
//! directory to `step-<N>` in one `rename(2)`, points `latest` at it, and applies retention.
//! A directory without a manifest is never a checkpoint, so a crash at any point leaves either
//! the old state or the new one, never a torn directory under a final name.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const LATEST: &str = "latest";
const STAGING_PREFIX: &str = ".staging-";
const STEP_PREFIX: &str = "step-";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("staging directory {} is not inside the checkpoint directory {}", staging.display(), root.display())]
    OutsideRoot { staging: PathBuf, root: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
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

#[derive(Debug, Serialize)]
struct ManifestFile {
    path: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Serialize)]
struct Manifest {
    format: &'static str,
    step: u64,
    is_final: bool,
    files: Vec<ManifestFile>,
}

pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// Removes staging directories left by an earlier, interrupted run. They never were checkpoints.
pub fn remove_stale_staging(root: &Path) -> Result<usize, CheckpointError> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            std::fs::remove_dir_all(entry.path()).map_err(io("remove", &entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Commits `staging` as the checkpoint of `step` and keeps the newest `keep` checkpoints.
pub fn commit(
    root: &Path,
    staging: &Path,
    step: u64,
    is_final: bool,
    keep: u32,
) -> Result<PathBuf, CheckpointError> {
    let root = std::fs::canonicalize(root).map_err(io("resolve", root))?;
    let staging = std::fs::canonicalize(staging).map_err(io("resolve", staging))?;
    let named_as_staging = staging
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(STAGING_PREFIX));
    if staging.parent() != Some(root.as_path()) || !named_as_staging {
        return Err(CheckpointError::OutsideRoot { staging, root });
    }

    let mut files = Vec::new();
    collect_files(&staging, &staging, &mut files)?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest {
        format: "ferrotune-checkpoint/1",
        step,
        is_final,
        files,
    };
    let manifest_path = staging.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    write_synced(&manifest_path, &json)?;
    sync_dir(&staging)?;

    let final_dir = root.join(step_dir_name(step));
    if final_dir.exists() {
        // The same step committed again (a rerun into the same directory): the new one wins.
        std::fs::remove_dir_all(&final_dir).map_err(io("replace", &final_dir))?;
    }
    std::fs::rename(&staging, &final_dir).map_err(io("rename into place", &final_dir))?;
    sync_dir(&root)?;

    let latest_tmp = root.join(format!("{LATEST}.tmp"));
    write_synced(&latest_tmp, format!("{}\n", step_dir_name(step)).as_bytes())?;
    std::fs::rename(&latest_tmp, root.join(LATEST)).map_err(io("update", &root.join(LATEST)))?;
    sync_dir(&root)?;

    apply_retention(&root, keep, &final_dir)?;
    Ok(final_dir)
}

/// Committed checkpoints (with a manifest) under `root`, oldest first.
pub fn committed(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(step) = name
                .strip_prefix(STEP_PREFIX)
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            if entry.path().join(MANIFEST).is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    out
}

fn apply_retention(root: &Path, keep: u32, just_committed: &Path) -> Result<(), CheckpointError> {
    let all = committed(root);
    let excess = all.len().saturating_sub(keep.max(1) as usize);
    for (_, dir) in all.into_iter().take(excess) {
        if dir != just_committed {
            std::fs::remove_dir_all(&dir).map_err(io("remove old checkpoint", &dir))?;
        }
    }
    Ok(())
}

fn collect_files(
    base: &Path,
    dir: &Path,
    out: &mut Vec<ManifestFile>,
) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let path = entry.path();
        if path.is_dir() {
            collect_files(base, &path, out)?;
        } else if path.file_name().is_some_and(|n| n != MANIFEST) {
            let (bytes, sha256) = hash_file(&path)?;
            let rel = path.strip_prefix(base).unwrap_or(&path);
            out.push(ManifestFile {
                path: rel.to_string_lossy().into_owned(),
                bytes,
                sha256,
            });
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    let mut file = std::fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let digest = hasher.finalize();
    let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((total, hex))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = std::fs::File::create(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(root: &Path, name: &str, content: &str) -> PathBuf {
        let dir = root.join(format!("{STAGING_PREFIX}{name}"));
        std::fs::create_dir_all(dir.join("training_state")).unwrap();
        std::fs::write(dir.join("model.safetensors"), content).unwrap();
        std::fs::write(dir.join("training_state/trainer_state.json"), "{}").unwrap();
        dir
    }

    #[test]
    fn commit_writes_manifest_renames_and_points_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = stage(tmp.path(), "a", "weights");
        let dir = commit(tmp.path(), &staging, 7, false, 2).unwrap();
        assert_eq!(dir.file_name().unwrap(), "step-00000007");
        assert!(!staging.exists());
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
        let files = manifest["files"].as_array().unwrap();
        assert_eq!(files.len(), 2);
        let model = files
            .iter()
            .find(|f| f["path"] == "model.safetensors")
            .unwrap();
        assert_eq!(model["bytes"], 7);
        // sha256(b"weights") from Python's hashlib.
        assert_eq!(
            model["sha256"],
            "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"
        );
        let latest = std::fs::read_to_string(tmp.path().join(LATEST)).unwrap();
        assert_eq!(latest.trim(), "step-00000007");
    }

    #[test]
    fn retention_keeps_newest_and_ignores_uncommitted() {
        let tmp = tempfile::tempdir().unwrap();
        for step in [1u64, 2, 3] {
            let s = stage(tmp.path(), &step.to_string(), "w");
            commit(tmp.path(), &s, step, false, 2).unwrap();
        }
        // A directory that looks like a checkpoint but has no manifest is not one.
        std::fs::create_dir_all(tmp.path().join("step-00000009")).unwrap();
        let steps: Vec<u64> = committed(tmp.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 3]);
    }

    #[test]
    fn refuses_staging_outside_root() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let staging = stage(elsewhere.path(), "x", "w");
        let err = commit(root.path(), &staging, 1, false, 1).unwrap_err();
        assert!(matches!(err, CheckpointError::OutsideRoot { .. }), "{err}");
        assert!(
            staging.exists(),
            "a refused commit must not touch the staging directory"
        );
    }

    #[test]
    fn stale_staging_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        stage(tmp.path(), "old", "w");
        assert_eq!(remove_stale_staging(tmp.path()).unwrap(), 1);
        assert!(committed(tmp.path()).is_empty());
    }
}
