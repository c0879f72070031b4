//! Committing checkpoints to shared storage.
//!
//! Ranks write into a staging directory (`.staging-*`) under the checkpoint root and report it
//! with the size and SHA-256 of every file they wrote. The commit checks the directory against
//! those reports (names and sizes: it reads no file, so a 7B checkpoint commits in
//! milliseconds), writes `manifest.json` from them, renames the staging
//! directory to `step-<N>` in one `rename(2)`, points `latest` at it, and applies retention.
//! A directory without a manifest is never a checkpoint, so a crash at any point leaves either
//! the old state or the new one, never a torn directory under a final name.

use ferrotune_data::manifest::{self, FileDigest, Manifest};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use ferrotune_data::manifest::MANIFEST;
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
    #[error("staged file {} {problem}; not committed", path.display())]
    NotAsReported { path: PathBuf, problem: String },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
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

/// Removes one staging directory that will never be committed (a report of an ended
/// generation). Only a `.staging-*` directory directly under `root` is touched: the path comes
/// from a worker.
pub fn discard_staging(root: &Path, staging: &Path) {
    let inside = staging.parent() == Some(root)
        && staging
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(STAGING_PREFIX));
    if !inside {
        tracing::warn!(path = %staging.display(), "not a staging directory of this job; left alone");
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(staging) {
        tracing::warn!(path = %staging.display(), "could not remove an uncommitted staging directory: {e}");
    }
}

/// Commits the staging directory `main` (with the files its writer reported) as the
/// checkpoint of `step`, once the files of the other ranks' `parts` (ZeRO: their optimizer
/// files) are moved into it, and keeps the newest `keep` checkpoints. Every directory is
/// checked against its report before anything moves; a refused commit leaves them all alone.
pub fn commit(
    root: &Path,
    (main, reported): (&Path, &[FileDigest]),
    parts: &[(PathBuf, Vec<FileDigest>)],
    step: u64,
    is_final: bool,
    keep: u32,
) -> Result<PathBuf, CheckpointError> {
    let root = std::fs::canonicalize(root).map_err(io("resolve", root))?;
    let staging = staging_of(&root, main)?;
    let mut files = check_reported(&staging, reported)?;
    let mut moves = Vec::new();
    let mut part_dirs = Vec::with_capacity(parts.len());
    for (dir, reported) in parts {
        let dir = staging_of(&root, dir)?;
        for f in check_reported(&dir, reported)? {
            if files.iter().any(|g| g.path == f.path) {
                return Err(CheckpointError::NotAsReported {
                    path: dir.join(&f.path),
                    problem: "is staged by two ranks".into(),
                });
            }
            moves.push((dir.join(&f.path), staging.join(&f.path)));
            files.push(f);
        }
        part_dirs.push(dir);
    }
    // The parts join the main directory by rename (same filesystem, no copy). A crash half
    // way leaves staging directories only, which never were checkpoints.
    let mut touched = std::collections::BTreeSet::new();
    for (from, to) in &moves {
        let parent = to.parent().unwrap_or(&staging);
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        std::fs::rename(from, to).map_err(io("move a part into", to))?;
        touched.insert(parent.to_path_buf());
    }
    for dir in &touched {
        sync_dir(dir)?;
    }
    for dir in &part_dirs {
        std::fs::remove_dir_all(dir).map_err(io("remove", dir))?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest {
        format: manifest::FORMAT.into(),
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

/// `dir`, resolved, when it is a staging directory directly under `root` (the path comes from
/// a worker).
fn staging_of(root: &Path, dir: &Path) -> Result<PathBuf, CheckpointError> {
    let staging = std::fs::canonicalize(dir).map_err(io("resolve", dir))?;
    let named_as_staging = staging
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(STAGING_PREFIX));
    if staging.parent() != Some(root) || !named_as_staging {
        return Err(CheckpointError::OutsideRoot {
            staging,
            root: root.to_path_buf(),
        });
    }
    Ok(staging)
}

/// Takes a damaged checkpoint out of the committed ones, kept for inspection: `step-N` becomes
/// `.damaged-step-N` (never resumed from, never counted by retention). Returns the new name.
pub fn set_aside(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = dir.parent().unwrap_or(Path::new("."));
    let mut target = parent.join(format!(".damaged-{name}"));
    let mut n = 1;
    while target.exists() {
        n += 1;
        target = parent.join(format!(".damaged-{name}.{n}"));
    }
    std::fs::rename(dir, &target).map_err(io("set aside", dir))?;
    sync_dir(parent)?;
    // `latest` must not name it any more.
    if let Some((step, _)) = committed(parent).pop() {
        let latest_tmp = parent.join(format!("{LATEST}.tmp"));
        write_synced(&latest_tmp, format!("{}\n", step_dir_name(step)).as_bytes())?;
        std::fs::rename(&latest_tmp, parent.join(LATEST))
            .map_err(io("update", &parent.join(LATEST)))?;
    } else {
        let _ = std::fs::remove_file(parent.join(LATEST));
    }
    Ok(target)
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

/// The reported files, sorted, once the staging directory holds exactly them at their sizes.
fn check_reported(
    staging: &Path,
    reported: &[FileDigest],
) -> Result<Vec<FileDigest>, CheckpointError> {
    let mut files = reported.to_vec();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let on_disk = manifest::list_files(staging)?;
    let mismatch = |path: &Path, problem: String| CheckpointError::NotAsReported {
        path: path.to_path_buf(),
        problem,
    };
    for (rel, path) in &on_disk {
        let Ok(i) = files.binary_search_by(|f| f.path.as_str().cmp(rel)) else {
            return Err(mismatch(path, "was not reported by its writer".into()));
        };
        let bytes = std::fs::metadata(path).map_err(io("inspect", path))?.len();
        if bytes != files[i].bytes {
            return Err(mismatch(
                path,
                format!("has {bytes} bytes, its writer reported {}", files[i].bytes),
            ));
        }
    }
    if let Some(missing) = files.iter().find(|f| {
        on_disk
            .binary_search_by(|(rel, _)| rel.as_str().cmp(&f.path))
            .is_err()
    }) {
        return Err(mismatch(
            &staging.join(&missing.path),
            "was reported but is not there".into(),
        ));
    }
    Ok(files)
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
    #[test]
    fn only_a_staging_directory_of_the_root_is_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let staged = root.join(".staging-00000006-r0-77");
        let checkpoint = root.join("step-00000003");
        std::fs::create_dir_all(staged.join("training_state")).unwrap();
        std::fs::create_dir_all(&checkpoint).unwrap();
        super::discard_staging(root, &checkpoint);
        super::discard_staging(root, &root.join("../elsewhere/.staging-1"));
        assert!(
            checkpoint.is_dir(),
            "a committed checkpoint is never discarded"
        );
        super::discard_staging(root, &staged);
        assert!(!staged.exists());
    }

    use super::*;

    fn stage(root: &Path, name: &str, content: &str) -> PathBuf {
        let dir = root.join(format!("{STAGING_PREFIX}{name}"));
        std::fs::create_dir_all(dir.join("training_state")).unwrap();
        std::fs::write(dir.join("model.safetensors"), content).unwrap();
        std::fs::write(dir.join("training_state/trainer_state.json"), "{}").unwrap();
        dir
    }

    /// What the writing rank reports: the digests of what it wrote.
    fn report(dir: &Path) -> Vec<FileDigest> {
        manifest::digest_tree(dir).unwrap()
    }

    /// Bytes this process has read through read(2) and friends (page cache hits included).
    fn rchar() -> u64 {
        let io = std::fs::read_to_string("/proc/self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_commit_reads_no_file_and_refuses_what_was_not_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = stage(tmp.path(), "big", "w");
        std::fs::write(staging.join("model.safetensors"), vec![7u8; 32 << 20]).unwrap();
        let files = report(&staging);
        let before = rchar();
        let dir = commit(tmp.path(), (&staging, &files), &[], 3, false, 2).unwrap();
        let read = rchar() - before;
        assert!(
            read < 1 << 20,
            "the commit read {read} bytes of a 32 MiB checkpoint"
        );
        Manifest::read(&dir).unwrap().verify(&dir).unwrap();

        // A file the writer did not report, one of another size, one that is missing.
        let extra = stage(tmp.path(), "extra", "w");
        let files = report(&extra);
        std::fs::write(extra.join("stray.bin"), "?").unwrap();
        let err = commit(tmp.path(), (&extra, &files), &[], 4, false, 2).unwrap_err();
        assert!(
            err.to_string().contains("stray.bin") && err.to_string().contains("not reported"),
            "{err}"
        );
        std::fs::remove_file(extra.join("stray.bin")).unwrap();
        std::fs::write(extra.join("model.safetensors"), "longer").unwrap();
        let err = commit(tmp.path(), (&extra, &files), &[], 4, false, 2).unwrap_err();
        assert!(
            err.to_string().contains("6 bytes, its writer reported 1"),
            "{err}"
        );
        std::fs::remove_file(extra.join("model.safetensors")).unwrap();
        let err = commit(tmp.path(), (&extra, &files), &[], 4, false, 2).unwrap_err();
        assert!(err.to_string().contains("is not there"), "{err}");
        assert!(
            extra.exists(),
            "a refused commit leaves the staging directory alone"
        );
    }

    #[test]
    fn commit_writes_manifest_renames_and_points_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = stage(tmp.path(), "a", "weights");
        let dir = commit(tmp.path(), (&staging, &report(&staging)), &[], 7, false, 2).unwrap();
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
            commit(tmp.path(), (&s, &report(&s)), &[], step, false, 2).unwrap();
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
        let err = commit(root.path(), (&staging, &report(&staging)), &[], 1, false, 1).unwrap_err();
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

    /// A rank's part: only its optimizer file.
    fn stage_part(root: &Path, rank: usize) -> PathBuf {
        let dir = root.join(format!("{STAGING_PREFIX}5-r{rank}"));
        let file = format!("training_state/optimizer-rank-{rank:05}-of-00003.safetensors");
        std::fs::create_dir_all(dir.join("training_state")).unwrap();
        std::fs::write(dir.join(file), format!("moments of rank {rank}")).unwrap();
        dir
    }

    #[test]
    fn parts_are_moved_into_rank_zeros_directory_and_all_in_the_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let main = stage(tmp.path(), "5-r0", "w");
        let parts: Vec<(PathBuf, Vec<FileDigest>)> = (1..3)
            .map(|r| {
                let d = stage_part(tmp.path(), r);
                let files = report(&d);
                (d, files)
            })
            .collect();
        // Refused first (a part's file not as reported): nothing moves.
        let mut wrong = parts.clone();
        wrong[1].1[0].bytes += 1;
        let err = commit(tmp.path(), (&main, &report(&main)), &wrong, 5, false, 2).unwrap_err();
        assert!(err.to_string().contains("its writer reported"), "{err}");
        assert!(parts.iter().all(|(d, _)| d.is_dir()) && main.is_dir());
        // The same file staged by two ranks is refused.
        let twice = vec![parts[0].clone(), parts[0].clone()];
        let err = commit(tmp.path(), (&main, &report(&main)), &twice, 5, false, 2).unwrap_err();
        assert!(err.to_string().contains("staged by two ranks"), "{err}");

        let dir = commit(tmp.path(), (&main, &report(&main)), &parts, 5, false, 2).unwrap();
        assert!(parts.iter().all(|(d, _)| !d.exists()), "parts are removed");
        let manifest = Manifest::read(&dir).unwrap();
        let names: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.safetensors",
                "training_state/optimizer-rank-00001-of-00003.safetensors",
                "training_state/optimizer-rank-00002-of-00003.safetensors",
                "training_state/trainer_state.json",
            ]
        );
        manifest.verify(&dir).unwrap();
    }
}
