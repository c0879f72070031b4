//! The update half of a training step, at every ZeRO stage: reduce the gradients, clip them by
//! their global norm, let AdamW step, and bring every rank's weights up to date.
//!
//! Stage 0 is plain data parallelism: every rank all-reduces every gradient and keeps every
//! AdamW moment. At stages 1 and 2 the fp32 parameters (the masters under bf16) become views of
//! one flat buffer, padded to `world_size` equal chunks, and rank r owns chunk r: it keeps the
//! AdamW moments of that chunk only (8 bytes per parameter become 8 / world_size) and updates
//! only those weights; an all-gather then hands every rank everyone's updated chunk. Stage 1
//! all-reduces the gradients as stage 0 does; stage 2 reduce-scatters them, so each rank
//! receives only its chunk of the sum and sends half the gradient bytes. Chunks may split a
//! tensor; the clipping norm is the all-reduce of the chunks' squared norms.
//!
//! AdamW runs element for element as `optim::AdamW` does (the same operations on narrowed
//! views), so a stage-1 or stage-2 step equals the stage-0 step up to the order in which the
//! clipping norm is summed. At a checkpoint every rank saves its own chunk of the moments
//! (`optimizer-rank-XXXXX-of-YYYYY.safetensors`, described by the shard map in
//! trainer_state.json); any stage at any world size resumes from any checkpoint, each rank
//! copying the ranges that overlap its chunk out of the saved files (checkpoint/optimizer.rs).

use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::grads::FlatGrads;
use crate::optim::{clip_coefficient, scale_and_clip, AdamW, AdamWConfig, OptimizerState};
use crate::precision::ComputeCopy;
use tch::{Kind, Tensor};

mod sharded;
pub use sharded::{Shard, ShardedAdamW};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Zero = 0,
    One = 1,
    Two = 2,
}

impl Stage {
    /// `training.zero_stage` as configured (0, 1 or 2; anything else is None).
    pub fn from_number(n: u32) -> Option<Stage> {
        match n {
            0 => Some(Stage::Zero),
            1 => Some(Stage::One),
            2 => Some(Stage::Two),
            _ => None,
        }
    }
}

enum Optimizer {
    Replicated(AdamW),
    Sharded {
        adamw: ShardedAdamW,
        /// Stage 2: this rank's chunk of the reduced gradient, which the gradients are
        /// reduce-scattered into (stage 1 all-reduces them).
        grad_chunk: Option<Tensor>,
    },
}

/// Gradient reduction, clipping and the optimizer, at the configured stage.
pub struct Updater {
    optimizer: Optimizer,
    /// The fp32 parameters (masters under bf16), in the optimizer's order.
    parameters: Vec<Tensor>,
    grads: FlatGrads,
    /// Bytes the collective sent while reducing the last step's gradients (0 where the
    /// collective does not count them), and the seconds that took.
    pub last_gradient_bytes: u64,
    pub last_reduce_seconds: f64,
    logged_fallback: bool,
}

impl Updater {
    /// `named`: the fp32 parameters (masters), in the optimizer's order; `compute`: the bf16
    /// copy that forward and backward run on, if any. At stages 1 and 2 under bf16 the whole
    /// masters are released: this rank keeps its chunk, rank 0 gathers them for checkpoints.
    pub fn new(
        stage: Stage,
        named: Vec<(String, Tensor)>,
        compute: Option<&ComputeCopy>,
        config: AdamWConfig,
        rank: usize,
        world_size: usize,
    ) -> Updater {
        let parameters: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
        let total: usize = parameters.iter().map(|p| p.numel()).sum();
        let padded = match stage {
            Stage::Zero => total,
            Stage::One | Stage::Two => Shard::new(total, rank, world_size).padded(),
        };
        // Laid out before the masters may be released below.
        let grads = FlatGrads::padded(&parameters, padded);
        let optimizer = match stage {
            Stage::Zero => Optimizer::Replicated(AdamW::new(named, config)),
            Stage::One | Stage::Two => {
                let adamw = ShardedAdamW::new(&named, compute, config, rank, world_size);
                let grad_chunk = (stage == Stage::Two).then(|| {
                    Tensor::zeros([adamw.shard.chunk as i64], (Kind::Float, grads.device()))
                });
                Optimizer::Sharded { adamw, grad_chunk }
            }
        };
        Updater {
            grads,
            optimizer,
            parameters,
            last_gradient_bytes: 0,
            last_reduce_seconds: 0.0,
            logged_fallback: false,
        }
    }

    pub fn state(&self) -> &dyn OptimizerState {
        match &self.optimizer {
            Optimizer::Replicated(a) => a,
            Optimizer::Sharded { adamw, .. } => adamw,
        }
    }

    pub fn state_mut(&mut self) -> &mut dyn OptimizerState {
        match &mut self.optimizer {
            Optimizer::Replicated(a) => a,
            Optimizer::Sharded { adamw, .. } => adamw,
        }
    }

    /// Reduces this step's gradients (backward's sums, in the parameters' `.grad` or in the
    /// bf16 `compute` copy's) and `scalars` (loss sum, label tokens, input tokens) over the
    /// ranks, scales the gradients to the mean over the global batch's label tokens, clips them
    /// to `max_norm` and steps; every rank ends with the same updated weights (cast into
    /// `compute` too). Returns the gradient norm before clipping.
    pub fn reduce_and_step(
        &mut self,
        compute: Option<&ComputeCopy>,
        scalars: &mut [f64; 3],
        lr: f64,
        max_norm: f64,
        collective: &mut dyn Collective,
    ) -> Result<f64, CollectiveError> {
        let (sent_before, reduce_started) = (collective.bytes_sent(), std::time::Instant::now());
        let traffic = |c: &dyn Collective| {
            let seconds = reduce_started.elapsed().as_secs_f64();
            (c.bytes_sent() - sent_before, seconds)
        };
        let norm = match &mut self.optimizer {
            Optimizer::Replicated(adamw) => {
                let mut grads = match compute {
                    Some(c) => self.grads.upcast_from(c),
                    None => self.grads.adopt(&self.parameters).unwrap_or_else(|| {
                        if !self.logged_fallback {
                            tracing::info!(
                                "a parameter has no gradient: gradients are packed per bucket"
                            );
                            self.logged_fallback = true;
                        }
                        adamw.gradients()
                    }),
                };
                collective.all_reduce_with_scalars(&mut grads, scalars, ReduceOp::Sum)?;
                (self.last_gradient_bytes, self.last_reduce_seconds) = traffic(collective);
                let norm = scale_and_clip(&grads, 1.0 / scalars[1].max(1.0), max_norm);
                match compute {
                    Some(_) => adamw.step_with(lr, &grads),
                    None => adamw.step(lr),
                }
                norm
            }
            Optimizer::Sharded { adamw, grad_chunk } => {
                // A parameter without gradient counts as a zero gradient here (as in DeepSpeed's
                // flat buffers): its weight still decays.
                match compute {
                    Some(c) => {
                        self.grads.upcast_from(c);
                    }
                    None => self.grads.adopt_or_fill(&self.parameters),
                }
                let mut flat = self.grads.flat();
                let shard = adamw.shard;
                let grad = match grad_chunk {
                    Some(out) => {
                        collective.reduce_scatter(&mut flat, out, ReduceOp::Sum)?;
                        (self.last_gradient_bytes, self.last_reduce_seconds) = traffic(collective);
                        collective.all_reduce_scalars(scalars, ReduceOp::Sum)?;
                        out.shallow_clone()
                    }
                    None => {
                        collective.all_reduce_with_scalars(
                            std::slice::from_mut(&mut flat),
                            scalars,
                            ReduceOp::Sum,
                        )?;
                        (self.last_gradient_bytes, self.last_reduce_seconds) = traffic(collective);
                        flat.narrow(0, shard.offset() as i64, shard.chunk as i64)
                    }
                };
                // The padding of the flat buffers is zero on every rank, so whole chunks can
                // be summed.
                let mut squares = [tch::no_grad(|| {
                    grad.pow_tensor_scalar(2).sum(Kind::Float).double_value(&[])
                })];
                collective.all_reduce_scalars(&mut squares, ReduceOp::Sum)?;
                let scale = 1.0 / scalars[1].max(1.0);
                let norm = squares[0].sqrt() * scale;
                let factor = scale * clip_coefficient(norm, max_norm);
                if factor != 1.0 {
                    tch::no_grad(|| {
                        let _ = grad.shallow_clone().g_mul_scalar_(factor);
                    });
                }
                adamw.step_chunk(lr, &grad);
                adamw.all_gather(collective)?;
                norm
            }
        };
        if let (Some(c), Optimizer::Replicated(_)) = (compute, &self.optimizer) {
            c.sync();
        }
        for p in &mut self.parameters {
            p.zero_grad();
        }
        Ok(norm)
    }

    /// Before a checkpoint, on every rank: brings what rank 0 writes beyond its own part to
    /// rank 0. Only the fp32 masters under bf16 at stages 1 and 2 (the model files are
    /// written from them); the moments stay where they are, each rank saves its own chunk.
    pub fn gather_for_checkpoint(
        &mut self,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError> {
        match &mut self.optimizer {
            Optimizer::Replicated(_) => Ok(()),
            Optimizer::Sharded { adamw, .. } => adamw.gather_masters(collective),
        }
    }
}
