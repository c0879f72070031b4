//! Which windows each rank trains on at each step.
//!
//! Every epoch is a seeded permutation of all windows. Optimizer step j of an epoch uses the
//! global batch `perm[j*G .. (j+1)*G]`, G = world_size × micro_batch × grad_accum; inside it,
//! micro-step m of rank r takes the `micro_batch` entries at `(m*world_size + r) * micro_batch`.
//! So the order is a pure function of (seed, epoch, world_size, rank), the ranks' slices are
//! disjoint, one worker with a micro-batch of W×b sees exactly the samples that W workers with b
//! see, and the position of any step is computed, never replayed: resuming costs O(1) steps.
//! The incomplete last global batch of an epoch is dropped.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct Sampler {
    n_samples: usize,
    seed: u64,
    world_size: usize,
    rank: usize,
    micro_batch: usize,
    grad_accum: usize,
    epoch_cache: Option<(u64, Vec<u32>)>,
}

impl Sampler {
    pub fn new(
        n_samples: usize,
        seed: u64,
        world_size: usize,
        rank: usize,
        micro_batch: usize,
        grad_accum: usize,
    ) -> Result<Self, String> {
        let sampler = Sampler {
            n_samples,
            seed,
            world_size,
            rank,
            micro_batch,
            grad_accum,
            epoch_cache: None,
        };
        if sampler.steps_per_epoch() == 0 {
            return Err(format!(
                "{n_samples} training sequences are fewer than one global batch ({} = {world_size} workers × micro_batch_size {micro_batch} × grad_accum_steps {grad_accum}); add data or lower data.seq_len, the batch size or the number of workers",
                sampler.global_batch()
            ));
        }
        Ok(sampler)
    }

    pub fn global_batch(&self) -> usize {
        self.world_size * self.micro_batch * self.grad_accum
    }

    pub fn steps_per_epoch(&self) -> u64 {
        (self.n_samples / self.global_batch()) as u64
    }

    /// (epoch, step within the epoch) of a global optimizer step: the data cursor.
    pub fn cursor(&self, step: u64) -> (u64, u64) {
        (step / self.steps_per_epoch(), step % self.steps_per_epoch())
    }

    /// The permutation of an epoch: a ChaCha stream per epoch off the job seed.
    pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.shuffle(&mut rng);
        perm
    }

    /// Window indices of this rank's micro-step `micro` of optimizer step `step`.
    pub fn micro_batch_indices(&mut self, step: u64, micro: usize) -> Vec<usize> {
        let (epoch, within) = self.cursor(step);
        if self.epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.epoch_cache = Some((epoch, Self::permutation(self.seed, epoch, self.n_samples)));
        }
        let perm = &self.epoch_cache.as_ref().expect("filled above").1;
        let start = within as usize * self.global_batch()
            + (micro * self.world_size + self.rank) * self.micro_batch;
        perm[start..start + self.micro_batch]
            .iter()
            .map(|&i| i as usize)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ranks_take_disjoint_slices_that_cover_the_global_batch() {
        let (n, w, b, acc) = (103, 3, 4, 2);
        let mut samplers: Vec<Sampler> = (0..w)
            .map(|r| Sampler::new(n, 7, w, r, b, acc).unwrap())
            .collect();
        let mut single = Sampler::new(n, 7, 1, 0, w * b, acc).unwrap();
        assert_eq!(samplers[0].steps_per_epoch(), (n / (w * b * acc)) as u64);
        for step in 0..10 {
            let mut seen = HashSet::new();
            for m in 0..acc {
                for s in samplers.iter_mut() {
                    for i in s.micro_batch_indices(step, m) {
                        assert!(seen.insert(i), "window {i} given twice in step {step}");
                    }
                }
            }
            let single_set: HashSet<usize> = (0..acc)
                .flat_map(|m| single.micro_batch_indices(step, m))
                .collect();
            assert_eq!(
                seen, single_set,
                "W workers × b must see what 1 worker × W·b sees"
            );
        }
    }

    #[test]
    fn order_depends_on_seed_and_epoch_only() {
        let a = Sampler::permutation(1, 0, 50);
        assert_eq!(a, Sampler::permutation(1, 0, 50));
        assert_ne!(a, Sampler::permutation(2, 0, 50));
        assert_ne!(a, Sampler::permutation(1, 1, 50));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
    }

    #[test]
    fn an_epoch_visits_each_window_at_most_once() {
        let mut s = Sampler::new(40, 3, 1, 0, 3, 1).unwrap();
        let spe = s.steps_per_epoch();
        let mut seen = HashSet::new();
        for step in 0..spe {
            for i in s.micro_batch_indices(step, 0) {
                assert!(seen.insert(i));
            }
        }
        assert_eq!(seen.len(), 39);
        // The next epoch starts a fresh permutation.
        assert_eq!(s.cursor(spe), (1, 0));
    }

    #[test]
    fn too_little_data_is_an_error_not_a_panic() {
        let err = Sampler::new(5, 0, 2, 0, 4, 1).unwrap_err();
        assert!(err.contains("fewer than one global batch"), "{err}");
    }
}
