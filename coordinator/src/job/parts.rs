//! Checkpoints staged in parts. At ZeRO stages 1 and 2 every rank stages its own optimizer file
//! and rank 0 everything else; the checkpoint of a step is committed once every part is in,
//! as one directory with one manifest. Parts of a periodic checkpoint are answered at once:
//! a rank waiting for the others' parts would wait in its call while they wait for it in the
//! next all-reduce. Parts of the final checkpoint are answered when it is committed.

use super::{Action, Job};
use ferrotune_data::manifest::FileDigest;
use std::collections::BTreeMap;

#[derive(Debug)]
pub(super) struct Part {
    pub rank: u32,
    pub staging_dir: String,
    pub files: Vec<FileDigest>,
}

/// The parts received of each step not yet complete.
#[derive(Debug, Default)]
pub(super) struct Parts {
    by_step: BTreeMap<u64, Vec<Part>>,
}

impl Parts {
    /// Adds `part` of `step` (a rank's earlier part of the step is replaced: its directory is
    /// returned to discard); returns every part, rank 0's first, when it was the last of `of`.
    fn add(&mut self, step: u64, of: u32, part: Part) -> (Option<Vec<Part>>, Option<String>) {
        let list = self.by_step.entry(step).or_default();
        let replaced = match list.iter().position(|p| p.rank == part.rank) {
            Some(i) => Some(std::mem::replace(&mut list[i], part).staging_dir),
            None => {
                list.push(part);
                None
            }
        };
        if list.len() < of as usize {
            return (None, replaced);
        }
        let mut all = self.by_step.remove(&step).unwrap_or_default();
        all.sort_by_key(|p| p.rank);
        (Some(all), replaced)
    }

    /// The staging directories of every part that will not be committed now (the generation
    /// ended, or the job).
    pub(super) fn drain(&mut self) -> Vec<String> {
        std::mem::take(&mut self.by_step)
            .into_values()
            .flatten()
            .map(|p| p.staging_dir)
            .collect()
    }
}

impl Job {
    /// A rank's staged part of the checkpoint of `step` (of the current generation), of `of`
    /// parts (0 or 1: rank 0's directory is the whole checkpoint).
    pub(super) fn on_checkpoint_part(
        &mut self,
        step: u64,
        is_final: bool,
        of: u32,
        part: Part,
    ) -> Vec<Action> {
        let refuse = |part: Part, why: String| {
            vec![
                Action::Refuse(format!("checkpoint of step {step} not committed: {why}")),
                Action::Discard {
                    staging_dir: part.staging_dir,
                },
            ]
        };
        if of <= 1 {
            if part.rank != 0 {
                let why = format!("rank {} is not the checkpoint writer", part.rank);
                return refuse(part, why);
            }
            self.commits_in_flight += 1;
            return vec![Action::Commit {
                step,
                staging_dir: part.staging_dir,
                is_final,
                files: part.files,
                parts: Vec::new(),
            }];
        }
        if of != self.world_size || part.rank >= of {
            let why = format!(
                "rank {} staged part of {of}, but the group has {} workers",
                part.rank, self.world_size
            );
            return refuse(part, why);
        }
        let mut actions = vec![if is_final {
            Action::HoldPart { step }
        } else {
            Action::AcceptPart
        }];
        let (complete, replaced) = self.parts.add(step, of, part);
        if let Some(staging_dir) = replaced {
            actions.push(Action::Discard { staging_dir });
        }
        if let Some(mut all) = complete {
            let main = all.remove(0);
            self.commits_in_flight += 1;
            actions.push(Action::Commit {
                step,
                staging_dir: main.staging_dir,
                is_final,
                files: main.files,
                parts: all.into_iter().map(|p| (p.staging_dir, p.files)).collect(),
            });
        }
        actions
    }

    /// Discards the parts that will not be committed any more.
    pub(super) fn discard_parts(&mut self) -> Vec<Action> {
        self.parts
            .drain()
            .into_iter()
            .map(|staging_dir| Action::Discard { staging_dir })
            .collect()
    }
}
