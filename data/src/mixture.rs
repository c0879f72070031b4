//! Which sequence each slot of the training stream holds, over one or several datasets.
//!
//! Slot d of the stream picks a dataset with probability proportional to its weight, from a
//! ChaCha stream addressed by d (random access, no replay); each dataset then hands out its
//! sequences in a seeded per-epoch permutation, starting a fresh one when it runs out. The whole
//! position is [`Cursor`]: the number of slots drawn and each dataset's (epoch, position). It is
//! saved in the training state; [`Mixture::resume`] continues from it after building at most
//! one permutation per dataset, whatever the step — resuming costs O(1) in the step.
//!
//! Data parallelism: every rank draws the same global batch of G = world × micro × accum slots;
//! micro-step m of rank r takes the `micro` slots at `(m·world + r)·micro` ([`rank_slice`]), so
//! one worker with a W·b micro-batch sees exactly what W workers with b see.

use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The ChaCha stream that chooses datasets; permutations use streams below 2^63.
const CHOICE_STREAM: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskCursor {
    pub epoch: u64,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub draws: u64,
    pub tasks: Vec<TaskCursor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub task: usize,
    pub sequence: usize,
}

/// A mixture that cannot be drawn from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixtureError {
    #[error("a mixture needs one size, weight and cursor per dataset (got {sizes}, {weights}, {cursors})")]
    Shape {
        sizes: usize,
        weights: usize,
        cursors: usize,
    },
    #[error("dataset {dataset} has no training sequences")]
    Empty { dataset: usize },
    #[error("weights must be positive numbers, got {0:?}")]
    Weights(Vec<f64>),
}

pub struct Mixture {
    seed: u64,
    sizes: Vec<usize>,
    cumulative: Vec<f64>,
    cursor: Cursor,
    permutations: Vec<Option<(u64, Vec<u32>)>>,
    choice: ChaCha8Rng,
    /// Elementary steps done so far (slots drawn + permutation entries generated): how tests
    /// check that resuming does not replay the past.
    pub work: u64,
}

impl Mixture {
    /// `sizes[i]` sequences in dataset i, drawn with relative weight `weights[i]`.
    pub fn new(seed: u64, sizes: &[usize], weights: &[f64]) -> Result<Self, MixtureError> {
        Self::resume(
            seed,
            sizes,
            weights,
            Cursor {
                draws: 0,
                tasks: vec![TaskCursor::default(); sizes.len()],
            },
        )
    }

    pub fn resume(
        seed: u64,
        sizes: &[usize],
        weights: &[f64],
        cursor: Cursor,
    ) -> Result<Self, MixtureError> {
        if sizes.is_empty() || sizes.len() != weights.len() || cursor.tasks.len() != sizes.len() {
            return Err(MixtureError::Shape {
                sizes: sizes.len(),
                weights: weights.len(),
                cursors: cursor.tasks.len(),
            });
        }
        if let Some(dataset) = sizes.iter().position(|&n| n == 0) {
            return Err(MixtureError::Empty { dataset });
        }
        if weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
            return Err(MixtureError::Weights(weights.to_vec()));
        }
        let total: f64 = weights.iter().sum();
        let cumulative = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w / total;
                Some(*acc)
            })
            .collect();
        let mut choice = ChaCha8Rng::seed_from_u64(seed);
        choice.set_stream(CHOICE_STREAM);
        Ok(Mixture {
            seed,
            sizes: sizes.to_vec(),
            cumulative,
            cursor,
            permutations: vec![None; sizes.len()],
            choice,
            work: 0,
        })
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// The permutation of dataset `task` in `epoch`.
    pub fn permutation(seed: u64, task: usize, epoch: u64, n: usize) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(((task as u64) << 40) | (epoch & ((1 << 40) - 1)));
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.shuffle(&mut rng);
        perm
    }

    fn choose(&mut self, draw: u64) -> usize {
        if self.sizes.len() == 1 {
            return 0;
        }
        // Two 32-bit words per draw: slot d's choice is at a fixed stream position.
        self.choice.set_word_pos(draw as u128 * 2);
        let u = (self.choice.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.sizes.len() - 1)
    }

    /// The next slot of the stream.
    pub fn next_slot(&mut self) -> Slot {
        let task = self.choose(self.cursor.draws);
        self.cursor.draws += 1;
        self.work += 1;
        let n = self.sizes[task];
        let c = &mut self.cursor.tasks[task];
        if c.position as usize >= n {
            c.epoch += 1;
            c.position = 0;
        }
        let (epoch, position) = (c.epoch, c.position as usize);
        c.position += 1;
        let fresh = !matches!(&self.permutations[task], Some((e, _)) if *e == epoch);
        if fresh {
            self.work += n as u64;
            self.permutations[task] = Some((epoch, Self::permutation(self.seed, task, epoch, n)));
        }
        let perm = &self.permutations[task].as_ref().expect("filled above").1;
        Slot {
            task,
            sequence: perm[position] as usize,
        }
    }

    pub fn next_slots(&mut self, n: usize) -> Vec<Slot> {
        (0..n).map(|_| self.next_slot()).collect()
    }
}

/// The slots of micro-step `micro` of `rank` within a global batch.
pub fn rank_slice<T>(
    global: &[T],
    world: usize,
    rank: usize,
    micro_batch: usize,
    micro: usize,
) -> &[T] {
    let start = (micro * world + rank) * micro_batch;
    &global[start..start + micro_batch]
}

#[cfg(test)]
#[path = "mixture_tests.rs"]
mod tests;
