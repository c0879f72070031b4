//! The sharded AdamW of ZeRO stages 1 and 2: rank r's equal chunk of the flat fp32 parameters
//! (or, under bf16, of the masters, which then exist only as chunks), its moments, the
//! all-gather that brings the updated chunks to every rank. Checkpoints save each rank's chunk
//! of the moments in its own file; under bf16 rank 0 gathers the fp32 masters for the model
//! files.

use crate::collective::{Collective, CollectiveError};
use crate::optim::{AdamWConfig, OptimizerState, UpdateRule};
use crate::precision::ComputeCopy;
use ferrotune_data::trainer_state::{
    optimizer_shard_file, FlatParameter, OptimizerShards, ShardFile,
};
use tch::{Device, Kind, Tensor};

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
    let counts: Vec<usize> = sizes.iter().map(|&(n, _)| n).collect();
    pieces(&counts, shard)
        .into_iter()
        .map(|(i, _, at, len)| Segment {
            at,
            len,
            decay: sizes[i].1,
        })
        .collect()
}

/// For every piece of a parameter (element counts in flat order) inside `shard`: (parameter
/// index, start inside the parameter, start inside the chunk, length).
fn pieces(sizes: &[usize], shard: &Shard) -> Vec<(usize, i64, i64, i64)> {
    let (lo, hi) = (shard.offset(), shard.offset() + shard.len());
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &n) in sizes.iter().enumerate() {
        let (a, b) = (start.max(lo), (start + n).min(hi));
        if a < b {
            out.push((i, (a - start) as i64, (a - lo) as i64, (b - a) as i64));
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

/// AdamW over one rank's chunk of the flat parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    step: u64,
    pub(super) shard: Shard,
    /// Name, shape and flat offset of every parameter, in the optimizer's order.
    layout: Vec<(String, Vec<i64>, usize)>,
    weights: Weights,
    segments: Vec<Segment>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Rank 0 under bf16, at a checkpoint: every rank's chunk of the fp32 masters, in host
    /// memory, laid out like the parameters.
    gathered: Option<Tensor>,
}

/// Element counts of the parameters of a layout, in order.
fn sizes_of(layout: &[(String, Vec<i64>, usize)]) -> Vec<usize> {
    layout
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<i64>() as usize)
        .collect()
}

impl ShardedAdamW {
    /// `named`: the fp32 parameters (masters). With a bf16 `compute` copy this rank keeps its
    /// chunk of the masters, and the whole masters are released (they become empty tensors).
    pub(super) fn new(
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
                    for (i, from, at, len) in pieces(&sizes_of(&layout), &shard) {
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
    pub(super) fn param_chunk(&self) -> Tensor {
        match &self.weights {
            Weights::Flat { flat } => {
                flat.narrow(0, self.shard.offset() as i64, self.shard.chunk as i64)
            }
            Weights::Masters { chunk, .. } => chunk.shallow_clone(),
        }
    }

    /// Every rank's updated chunk to every rank: the fp32 parameters, or (cast first) the bf16
    /// compute weights.
    pub(super) fn all_gather(
        &self,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError> {
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
    pub(super) fn step_chunk(&mut self, lr: f64, grad: &Tensor) {
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

    /// Under bf16, every rank's chunk of the fp32 masters to rank 0 (in host memory there),
    /// one chunk at a time: no rank ever holds more than one other rank's chunk on its device.
    /// fp32 training needs nothing: every rank's parameters are whole after the all-gather.
    pub(super) fn gather_masters(
        &mut self,
        collective: &mut dyn Collective,
    ) -> Result<(), CollectiveError> {
        let Weights::Masters { chunk: mine, .. } = &self.weights else {
            return Ok(());
        };
        let shard = self.shard;
        let device = mine.device();
        if shard.rank == 0 && self.gathered.is_none() {
            self.gathered = Some(crate::device::host_buffer(
                &[shard.total as i64],
                Kind::Float,
                device,
            ));
        }
        for owner in 0..shard.world {
            let theirs = Shard {
                rank: owner,
                ..shard
            };
            let mut chunk = if owner == shard.rank {
                mine.shallow_clone()
            } else {
                Tensor::empty([shard.chunk as i64], (Kind::Float, device))
            };
            collective.broadcast(&mut chunk, owner)?;
            let n = theirs.len() as i64;
            if let (Some(into), true) = (&self.gathered, n > 0) {
                tch::no_grad(|| {
                    into.narrow(0, theirs.offset() as i64, n)
                        .copy_(&chunk.narrow(0, 0, n))
                });
            }
        }
        Ok(())
    }

    /// Per-parameter views of a flat vector laid out like the parameters.
    fn per_parameter(&self, flat: &Tensor) -> Vec<(String, Tensor)> {
        self.layout
            .iter()
            .map(|(name, shape, offset)| {
                let n: i64 = shape.iter().product();
                let view = flat.narrow(0, *offset as i64, n).view(shape.as_slice());
                (name.clone(), view)
            })
            .collect()
    }
}

impl OptimizerState for ShardedAdamW {
    fn step_count(&self) -> u64 {
        self.step
    }

    fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.layout
            .iter()
            .map(|(name, shape, _)| (name.clone(), shape.clone()))
            .collect()
    }

    /// This rank's chunk of the moments (without the padding).
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let len = self.shard.len() as i64;
        vec![
            ("exp_avg".into(), self.exp_avg.narrow(0, 0, len)),
            ("exp_avg_sq".into(), self.exp_avg_sq.narrow(0, 0, len)),
        ]
    }

    fn shards(&self) -> Option<(usize, OptimizerShards)> {
        let parameters = self
            .layout
            .iter()
            .map(|(name, shape, offset)| FlatParameter {
                name: name.clone(),
                shape: shape.clone(),
                offset: *offset as u64,
            })
            .collect();
        let files = (0..self.shard.world)
            .map(|rank| {
                let s = Shard { rank, ..self.shard };
                let start = s.offset().min(s.total);
                ShardFile {
                    file: optimizer_shard_file(rank, s.world),
                    start: start as u64,
                    end: (start + s.len()) as u64,
                }
            })
            .collect();
        Some((self.shard.rank, OptimizerShards { parameters, files }))
    }

    /// Rank 0 after `gather_masters` under bf16: the fp32 masters, of which no rank holds all.
    fn master_weights(&self) -> Option<Vec<(String, Tensor)>> {
        let masters = self.gathered.as_ref()?;
        Some(self.per_parameter(masters))
    }

    /// Copies the part of the piece that falls into this rank's chunk: restoring from moments
    /// saved per parameter or by any world size is the same operation.
    fn load_piece(&mut self, index: usize, from: i64, exp_avg: &Tensor, exp_avg_sq: &Tensor) {
        let start = self.layout[index].2 as i64 + from;
        let end = start + exp_avg.numel() as i64;
        let (lo, hi) = (
            self.shard.offset() as i64,
            (self.shard.offset() + self.shard.len()) as i64,
        );
        let (a, b) = (start.max(lo), end.min(hi));
        if a >= b {
            return;
        }
        tch::no_grad(|| {
            for (into, from) in [(&self.exp_avg, exp_avg), (&self.exp_avg_sq, exp_avg_sq)] {
                into.narrow(0, a - lo, b - a)
                    .copy_(&from.narrow(0, a - start, b - a));
            }
        });
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
