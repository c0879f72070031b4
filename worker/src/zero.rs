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
//! clipping norm is summed. Checkpoints do not change: at a checkpoint every rank sends its
//! moments to rank 0, which writes them per parameter as stage 0 does; so any stage at any world
//! size resumes from any checkpoint, each rank taking its chunk of the saved moments.

use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::grads::FlatGrads;
use crate::optim::{
    clip_coefficient, scale_and_clip, AdamW, AdamWConfig, OptimizerState, UpdateRule,
};
use crate::precision::ComputeCopy;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Zero = 0,
    One = 1,
    Two = 2,
}

/// Rank `rank`'s chunk of a flat vector of `total` elements padded to `world` chunks of `chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub total: usize,
    pub chunk: usize,
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub fn new(total: usize, rank: usize, world: usize) -> Shard {
        let world = world.max(1);
        Shard {
            total,
            // Even, so that a chunk of bf16 weights is a whole number of f32 words for the
            // collective (which moves them as f32: an all-gather only copies).
            chunk: total.div_ceil(world).max(1).next_multiple_of(2),
            rank,
            world,
        }
    }

    /// Elements of the padded flat buffers: `world` chunks.
    pub fn padded(&self) -> usize {
        self.chunk * self.world
    }

    /// Where this rank's chunk starts in the flat vector.
    pub fn offset(&self) -> usize {
        self.rank * self.chunk
    }

    /// The real (unpadded) elements of this rank's chunk.
    pub fn len(&self) -> usize {
        self.total.saturating_sub(self.offset()).min(self.chunk)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The part of one parameter inside a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    /// Start inside the chunk.
    at: i64,
    len: i64,
    decay: bool,
}

/// The pieces of the parameters (element counts in flat order) that fall into `shard`.
fn segments(sizes: &[(usize, bool)], shard: &Shard) -> Vec<Segment> {
    let (lo, hi) = (shard.offset(), shard.offset() + shard.len());
    let mut out = Vec::new();
    let mut start = 0;
    for &(n, decay) in sizes {
        let (a, b) = (start.max(lo), (start + n).min(hi));
        if a < b {
            out.push(Segment {
                at: (a - lo) as i64,
                len: (b - a) as i64,
                decay,
            });
        }
        start += n;
    }
    out
}

/// Makes `params` views of one flat buffer of `len` elements of `kind` (their values kept, the
/// rest zero), as `FlatGrads` does for their gradients; returns the buffer.
fn flatten(params: &[Tensor], len: usize, kind: Kind) -> Tensor {
    let device = params.first().map_or(Device::Cpu, |p| p.device());
    let flat = Tensor::zeros([len as i64], (kind, device));
    let mut offset = 0;
    tch::no_grad(|| {
        for p in params {
            let n = p.numel() as i64;
            let view = flat.narrow(0, offset, n).view(p.size().as_slice());
            view.shallow_clone().copy_(p);
            // Every handle on this parameter (the model's, the optimizer's, the compute copy's
            // pairs) shares its TensorImpl, so all of them now read the flat buffer.
            p.shallow_clone().set_data(&view);
            offset += n;
        }
    });
    flat
}

/// The weights a sharded optimizer updates, and how every rank gets them back.
enum Weights {
    /// fp32 training: the parameters are views of `flat` (padded); this rank's chunk of it is
    /// updated and all-gathered in place.
    Flat { flat: Tensor },
    /// bf16 compute: this rank's chunk of the fp32 masters is the only fp32 copy there is; it
    /// is cast into its chunk of the compute weights (views of `compute`, bf16, padded), which
    /// are all-gathered.
    Masters { chunk: Tensor, compute: Tensor },
}

/// Rank 0 at a checkpoint: every rank's chunks, in host memory, laid out like the parameters.
struct Gathered {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    masters: Option<Tensor>,
}

/// AdamW over one rank's chunk of the flat parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    step: u64,
    shard: Shard,
    /// Name, shape and flat offset of every parameter, in the optimizer's order.
    layout: Vec<(String, Vec<i64>, usize)>,
    weights: Weights,
    segments: Vec<Segment>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    gathered: Option<Gathered>,
}

/// For every piece of a parameter inside `shard`: (parameter index, start inside the
/// parameter, start inside the chunk, length).
fn pieces(layout: &[(String, Vec<i64>, usize)], shard: &Shard) -> Vec<(usize, i64, i64, i64)> {
    let (lo, hi) = (shard.offset(), shard.offset() + shard.len());
    let mut out = Vec::new();
    for (i, (_, shape, offset)) in layout.iter().enumerate() {
        let n = shape.iter().product::<i64>() as usize;
        let (a, b) = ((*offset).max(lo), (offset + n).min(hi));
        if a < b {
            out.push((i, (a - offset) as i64, (a - lo) as i64, (b - a) as i64));
        }
    }
    out
}

impl ShardedAdamW {
    /// `named`: the fp32 parameters (masters). With a bf16 `compute` copy this rank keeps its
    /// chunk of the masters, and the whole masters are released (they become empty tensors).
    fn new(
        named: &[(String, Tensor)],
        compute: Option<&ComputeCopy>,
        config: AdamWConfig,
        rank: usize,
        world: usize,
    ) -> Self {
        let mut layout = Vec::with_capacity(named.len());
        let mut offset = 0;
        for (name, p) in named {
            layout.push((name.clone(), p.size(), offset));
            offset += p.numel();
        }
        let shard = Shard::new(offset, rank, world);
        let tensors: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
        let device = tensors.first().map_or(Device::Cpu, |p| p.device());
        let sizes: Vec<(usize, bool)> = named
            .iter()
            .map(|(_, p)| (p.numel(), p.dim() >= 2))
            .collect();
        let weights = match compute {
            None => Weights::Flat {
                flat: flatten(&tensors, shard.padded(), Kind::Float),
            },
            Some(c) => {
                let chunk = Tensor::zeros([shard.chunk as i64], (Kind::Float, device));
                tch::no_grad(|| {
                    for (i, from, at, len) in pieces(&layout, &shard) {
                        let piece = tensors[i].reshape([-1]).narrow(0, from, len);
                        chunk.narrow(0, at, len).copy_(&piece);
                    }
                    for p in &tensors {
                        p.shallow_clone()
                            .set_data(&Tensor::empty([0], (Kind::Float, device)));
                    }
                });
                let compute = flatten(&c.model_parameters(), shard.padded(), c.kind());
                Weights::Masters { chunk, compute }
            }
        };
        let moment = || Tensor::zeros([shard.chunk as i64], (Kind::Float, device));
        ShardedAdamW {
            config,
            step: 0,
            segments: segments(&sizes, &shard),
            exp_avg: moment(),
            exp_avg_sq: moment(),
            weights,
            shard,
            layout,
            gathered: None,
        }
    }

    /// This rank's chunk of the fp32 weights it updates (padding included).
    fn param_chunk(&self) -> Tensor {
        match &self.weights {
            Weights::Flat { flat } => {
                flat.narrow(0, self.shard.offset() as i64, self.shard.chunk as i64)
            }
            Weights::Masters { chunk, .. } => chunk.shallow_clone(),
        }
    }

    /// Every rank's updated chunk to every rank: the fp32 parameters, or (cast first) the bf16
    /// compute weights.
    fn all_gather(&self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        let (at, len) = (self.shard.offset() as i64, self.shard.chunk as i64);
        let (mine, mut whole) = match &self.weights {
            Weights::Flat { flat } => (flat.narrow(0, at, len), flat.shallow_clone()),
            Weights::Masters { chunk, compute } => {
                let mine = compute.narrow(0, at, len);
                tch::no_grad(|| mine.shallow_clone().copy_(chunk));
                // The collective moves f32 words; a bf16 chunk (of even length) is half as
                // many. An all-gather only copies, so the bits arrive as they left.
                (
                    mine.view_dtype(Kind::Float),
                    compute.view_dtype(Kind::Float),
                )
            }
        };
        // In place: this rank's chunk of `whole` is the input (as NCCL allows).
        collective.all_gather(&mine, &mut whole)
    }

    /// One update of this rank's chunk from its chunk of the (scaled, clipped) gradient.
    fn step_chunk(&mut self, lr: f64, grad: &Tensor) {
        self.step += 1;
        let rule = UpdateRule::new(&self.config, self.step, lr);
        let chunk = self.param_chunk();
        tch::no_grad(|| {
            // Segment by segment, as optim::AdamW goes parameter by parameter.
            for s in &self.segments {
                let piece = |t: &Tensor| t.narrow(0, s.at, s.len);
                rule.apply(
                    &piece(&chunk),
                    &piece(grad),
                    &piece(&self.exp_avg),
                    &piece(&self.exp_avg_sq),
                    s.decay,
                );
            }
        });
    }

    /// Every rank's moments to rank 0 (in host memory there), one chunk at a time: no rank
    /// ever holds more than one other rank's chunk on its device.
    fn gather(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        let shard = self.shard;
        let device = self.exp_avg.device();
        let masters = match &self.weights {
            Weights::Masters { chunk, .. } => Some(chunk.shallow_clone()),
            Weights::Flat { .. } => None,
        };
        if shard.rank == 0 && self.gathered.is_none() {
            let host = || crate::device::host_buffer(&[shard.total as i64], Kind::Float, device);
            self.gathered = Some(Gathered {
                exp_avg: host(),
                exp_avg_sq: host(),
                masters: masters.as_ref().map(|_| host()),
            });
        }
        let mut parts = vec![
            self.exp_avg.shallow_clone(),
            self.exp_avg_sq.shallow_clone(),
        ];
        parts.extend(masters);
        for owner in 0..shard.world {
            let theirs = Shard {
                rank: owner,
                ..shard
            };
            for (which, mine) in parts.iter().enumerate() {
                let mut chunk = if owner == shard.rank {
                    mine.shallow_clone()
                } else {
                    Tensor::empty([shard.chunk as i64], (Kind::Float, device))
                };
                collective.broadcast(&mut chunk, owner)?;
                let n = theirs.len() as i64;
                if let (Some(g), true) = (&self.gathered, n > 0) {
                    let into = match which {
                        0 => &g.exp_avg,
                        1 => &g.exp_avg_sq,
                        _ => g.masters.as_ref().expect("gathered with the masters"),
                    };
                    tch::no_grad(|| {
                        into.narrow(0, theirs.offset() as i64, n)
                            .copy_(&chunk.narrow(0, 0, n))
                    });
                }
            }
        }
        Ok(())
    }

    /// Per-parameter views of a flat vector laid out like the parameters.
    fn per_parameter(&self, flat: &Tensor, prefix: &str) -> Vec<(String, Tensor)> {
        self.layout
            .iter()
            .map(|(name, shape, offset)| {
                let n: i64 = shape.iter().product();
                let view = flat.narrow(0, *offset as i64, n).view(shape.as_slice());
                (format!("{prefix}{name}"), view)
            })
            .collect()
    }
}

impl OptimizerState for ShardedAdamW {
    fn step_count(&self) -> u64 {
        self.step
    }

    /// What `gather` brought to rank 0, named as stage 0 names it; empty elsewhere.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let Some(g) = &self.gathered else {
            return Vec::new();
        };
        let mut out = self.per_parameter(&g.exp_avg, "exp_avg.");
        out.extend(self.per_parameter(&g.exp_avg_sq, "exp_avg_sq."));
        out
    }

    /// Rank 0 after `gather` under bf16: the fp32 masters, of which no rank holds all.
    fn master_weights(&self) -> Option<Vec<(String, Tensor)>> {
        let masters = self.gathered.as_ref()?.masters.as_ref()?;
        Some(self.per_parameter(masters, ""))
    }

    /// Takes this rank's chunk out of moments saved per parameter (by any stage, at any world
    /// size): that is all re-sharding needs.
    fn load_state(&mut self, mut saved: HashMap<String, Tensor>, step: u64) -> Result<(), String> {
        let (lo, hi) = (self.shard.offset(), self.shard.offset() + self.shard.len());
        for (name, shape, offset) in &self.layout {
            let n: usize = shape.iter().product::<i64>() as usize;
            for (prefix, moment) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
                let key = format!("{prefix}.{name}");
                let t = saved
                    .remove(&key)
                    .ok_or_else(|| format!("`{key}` is missing"))?;
                if t.size() != *shape || t.kind() != Kind::Float {
                    return Err(format!(
                        "`{key}` is {:?} {:?}, the parameter Float {shape:?}",
                        t.kind(),
                        t.size()
                    ));
                }
                let (a, b) = ((*offset).max(lo), (offset + n).min(hi));
                if a < b {
                    let piece = t
                        .reshape([-1])
                        .narrow(0, (a - offset) as i64, (b - a) as i64);
                    tch::no_grad(|| {
                        moment
                            .narrow(0, (a - lo) as i64, (b - a) as i64)
                            .copy_(&piece)
                    });
                }
            }
        }
        if let Some(extra) = saved.keys().next() {
            return Err(format!("`{extra}` belongs to no parameter of this model"));
        }
        self.step = step;
        Ok(())
    }
}

enum Optimizer {
    Replicated(AdamW),
    Sharded {
        adamw: ShardedAdamW,
        stage: Stage,
        /// Stage 2: this rank's chunk of the reduced gradient.
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
                Optimizer::Sharded {
                    adamw,
                    stage,
                    grad_chunk,
                }
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
            Optimizer::Sharded {
                adamw,
                stage,
                grad_chunk,
            } => {
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
                let grad = match (stage, grad_chunk) {
                    (Stage::Two, Some(out)) => {
                        collective.reduce_scatter(&mut flat, out, ReduceOp::Sum)?;
                        (self.last_gradient_bytes, self.last_reduce_seconds) = traffic(collective);
                        collective.all_reduce_scalars(scalars, ReduceOp::Sum)?;
                        out.shallow_clone()
                    }
                    _ => {
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

    /// Before a checkpoint, on every rank: brings the optimizer state to rank 0, which writes
    /// it (nothing to do at stage 0, where rank 0 has it all).
    pub fn gather_state(&mut self, collective: &mut dyn Collective) -> Result<(), CollectiveError> {
        match &mut self.optimizer {
            Optimizer::Replicated(_) => Ok(()),
            Optimizer::Sharded { adamw, .. } => adamw.gather(collective),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_balanced_cover_everything_once_and_split_tensors() {
        for (total, world) in [(10, 3), (9, 3), (1, 2), (4, 3), (1001, 7)] {
            let shards: Vec<Shard> = (0..world).map(|r| Shard::new(total, r, world)).collect();
            assert_eq!(shards.iter().map(Shard::len).sum::<usize>(), total);
            let mut next = 0;
            for s in shards.iter().filter(|s| !s.is_empty()) {
                assert_eq!(s.offset(), next);
                next += s.len();
                assert!(s.len() <= total.div_ceil(world) + 1);
                assert!(s.chunk.is_multiple_of(2));
            }
        }
        // Parameters of 3, 4 and 3 elements over 3 ranks of 4: the second is split.
        let sizes = [(3, true), (4, false), (3, true)];
        let got: Vec<Vec<Segment>> = (0..3)
            .map(|r| segments(&sizes, &Shard::new(10, r, 3)))
            .collect();
        let seg = |at, len, decay| Segment { at, len, decay };
        assert_eq!(got[0], [seg(0, 3, true), seg(3, 1, false)]);
        assert_eq!(got[1], [seg(0, 3, false), seg(3, 1, true)]);
        assert_eq!(got[2], [seg(0, 2, true)]);
    }

    #[test]
    fn flattening_keeps_values_and_shares_storage() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[5.0f32]);
        let handle = a.shallow_clone();
        let flat = flatten(&[a.shallow_clone(), b.shallow_clone()], 6, Kind::Float);
        assert_eq!(
            Vec::<f32>::try_from(&flat).unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 0.0]
        );
        let _ = flat.narrow(0, 0, 1).fill_(9.0);
        assert_eq!(
            handle.double_value(&[0, 0]),
            9.0,
            "the parameter reads the buffer"
        );
        assert_eq!(handle.size(), [2, 2]);
    }
}
