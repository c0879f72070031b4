//! `coordinator launch --resume [CHECKPOINT]`: which committed checkpoint a job continues from,
//! and whether this config can continue it exactly. Everything is checked before any worker
//! starts; the workers then restore weights, optimizer moments, step and data cursor from it.

use crate::checkpoint::{self, MANIFEST};
use crate::config::JobConfig;
pub use crate::config::Resume;
use ferrotune_data::trainer_state::{StateFileError, TrainerState};
use std::path::{Path, PathBuf};

/// `--resume` without a value: the newest committed checkpoint under `checkpoint.dir`.
pub const LATEST: &str = "latest";

/// Why a job cannot continue from the checkpoint asked for; each says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("--resume: no committed checkpoint under {} (a step-N directory with {MANIFEST}); start without --resume, or name a checkpoint directory", dir.display())]
    NoneCommitted { dir: PathBuf },
    #[error("--resume: {} is not a committed checkpoint (no {MANIFEST}); name a step-N directory that has one", dir.display())]
    NotCommitted { dir: PathBuf },
    #[error("--resume: cannot read {0}; that checkpoint cannot be continued")]
    State(#[from] StateFileError),
    #[error("{}: `{field}` is {now}, but {} was trained with {then}; the run would not continue where it stopped. Resume with the same value, or start a new run without --resume", config.display(), checkpoint.display())]
    Differs {
        config: PathBuf,
        checkpoint: PathBuf,
        field: &'static str,
        now: String,
        then: String,
    },
    #[error("{}: {} is at step {step}, and `training.steps` is {steps}: nothing is left to train. Raise training.steps to train further", config.display(), checkpoint.display())]
    NothingLeft {
        config: PathBuf,
        checkpoint: PathBuf,
        step: u64,
        steps: u64,
    },
}

/// The newest committed checkpoint whose files are all there at their manifest's sizes (a
/// cheap check: no file is read; the workers verify the hashes as they load). A damaged one is
/// set aside with a warning naming the file, and the one before it is taken.
fn newest_intact(root: &Path) -> Option<PathBuf> {
    while let Some((_, dir)) = checkpoint::committed(root).pop() {
        let damage = ferrotune_data::manifest::Manifest::read(&dir)
            .and_then(|m| m.check_sizes(&dir))
            .err();
        let Some(e) = damage else {
            return Some(dir);
        };
        match checkpoint::set_aside(&dir) {
            Ok(to) => eprintln!(
                "warning: {e}\n  {} is set aside as {}; resuming from the checkpoint before it",
                dir.display(),
                to.display()
            ),
            Err(err) => {
                eprintln!("warning: {e}; and it could not be set aside: {err}");
                return None;
            }
        }
    }
    None
}

/// The checkpoint a restarted generation continues from: `set_aside` (a checkpoint whose file
/// a worker found damaged: its directory and the file) is renamed out of the way first, then
/// the newest of `candidates` (newest first) whose files are all there at their sizes. None:
/// no checkpoint is left, and the generation starts from the model.
pub fn choose_restart_point(
    candidates: &[String],
    set_aside: Option<&(String, String)>,
) -> Option<String> {
    if let Some((dir, file)) = set_aside {
        let dir = Path::new(dir);
        match checkpoint::set_aside(dir) {
            Ok(to) => eprintln!(
                "warning: {file} does not match its checkpoint's manifest; {} is set aside as {}; the restart continues from the checkpoint before it",
                dir.display(),
                to.display()
            ),
            Err(e) => eprintln!(
                "warning: {file} does not match its checkpoint's manifest, and {} could not be set aside: {e}",
                dir.display()
            ),
        }
    }
    for dir in candidates.iter().map(Path::new) {
        if !dir.join(checkpoint::MANIFEST).is_file() {
            // Removed by retention, or set aside.
            continue;
        }
        match ferrotune_data::manifest::Manifest::read(dir).and_then(|m| m.check_sizes(dir)) {
            Ok(()) => return Some(dir.to_string_lossy().into_owned()),
            Err(e) => match checkpoint::set_aside(dir) {
                Ok(to) => eprintln!(
                    "warning: {e}\n  {} is set aside as {}; the restart continues from the checkpoint before it",
                    dir.display(),
                    to.display()
                ),
                Err(err) => eprintln!("warning: {e}; and it could not be set aside: {err}"),
            },
        }
    }
    None
}

/// Resolves `requested` (a checkpoint directory, or [`LATEST`]) against `config`.
pub fn choose(config: &JobConfig, requested: &str) -> Result<Resume, ResumeError> {
    let dir = if requested == LATEST {
        newest_intact(&config.checkpoint_dir).ok_or_else(|| ResumeError::NoneCommitted {
            dir: config.checkpoint_dir.clone(),
        })?
    } else {
        PathBuf::from(requested)
    };
    if !dir.join(MANIFEST).is_file() {
        return Err(ResumeError::NotCommitted { dir });
    }
    let saved = TrainerState::read(&dir)?;
    check(config, &dir, &saved)?;
    Ok(Resume {
        dir,
        step: saved.step,
        datasets: saved.datasets,
    })
}

/// Indices of the datasets whose training data (bytes or recipe, as the cache names say)
/// differ from the checkpoint's. Continuing is allowed (fixing data mid-run is legitimate), but
/// the order then is not the interrupted run's, so the user is told.
pub fn changed_datasets(resume: &Resume, train_caches: &[String]) -> Vec<usize> {
    if resume.datasets.is_empty() {
        return Vec::new();
    }
    (0..train_caches.len())
        .filter(|&i| resume.datasets.get(i) != train_caches.get(i))
        .collect()
}

fn check(config: &JobConfig, dir: &Path, saved: &TrainerState) -> Result<(), ResumeError> {
    let global_batch = u64::from(config.cluster.world_size)
        * u64::from(config.micro_batch_size)
        * u64::from(config.grad_accum_steps);
    let differs = |field: &'static str, now: String, then: String| ResumeError::Differs {
        config: config.source.clone(),
        checkpoint: dir.to_path_buf(),
        field,
        now,
        then,
    };
    if config.seed != saved.seed {
        return Err(differs(
            "job.seed",
            config.seed.to_string(),
            saved.seed.to_string(),
        ));
    }
    if config.data.seq_len as usize != saved.seq_len {
        return Err(differs(
            "data.seq_len",
            config.data.seq_len.to_string(),
            saved.seq_len.to_string(),
        ));
    }
    if global_batch != saved.global_batch_sequences as u64 {
        return Err(differs(
            "cluster.world_size × training.micro_batch_size × training.grad_accum_steps",
            format!("{global_batch} sequences per step"),
            saved.global_batch_sequences.to_string(),
        ));
    }
    if config.data.datasets.len() != saved.data_cursor.tasks.len() {
        return Err(differs(
            "data.datasets",
            format!("{} datasets", config.data.datasets.len()),
            saved.data_cursor.tasks.len().to_string(),
        ));
    }
    if saved.step >= config.steps {
        return Err(ResumeError::NothingLeft {
            config: config.source.clone(),
            checkpoint: dir.to_path_buf(),
            step: saved.step,
            steps: config.steps,
        });
    }
    Ok(())
}
