//! Collectives between the ranks of a data-parallel group.
//!
//! The training loop sees only [`Collective`]. The CPU backend is a TCP ring ([`ring`]); the NCCL
//! backend for GPUs implements the same trait. Gradients are packed into flat buckets so that a
//! model with hundreds of small tensors costs a few large transfers, not hundreds of small ones.

pub mod flat;
pub mod nccl;
mod pipeline;
pub mod ring;

use std::time::Duration;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {peer} did not answer within {timeout:?} ({during})")]
    Timeout {
        peer: usize,
        timeout: Duration,
        during: &'static str,
    },
    #[error("lost the connection to rank {peer} ({during}): {source}")]
    PeerLost {
        peer: usize,
        during: &'static str,
        source: std::io::Error,
    },
    #[error("could not connect to rank {peer} at {address} within {timeout:?}: {source}")]
    Connect {
        peer: usize,
        address: String,
        timeout: Duration,
        source: std::io::Error,
    },
    #[error("no valid connection from rank {peer} within {timeout:?}")]
    NoIncoming { peer: usize, timeout: Duration },
    #[error("collective setup: {0}")]
    Setup(String),
    #[error("the collective reduces {expected}, got {kind:?} on {device:?}")]
    UnsupportedTensor {
        kind: Kind,
        device: tch::Device,
        expected: &'static str,
    },
    /// NCCL failed, timed out or was aborted (the generation ended); the communicator is gone.
    #[error("NCCL {during}: {message}")]
    Nccl {
        during: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
}

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Reduces each tensor in place across all ranks. Every rank passes tensors of the same
    /// shapes in the same order and ends with bitwise identical results.
    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError>;

    /// Reduces a few scalars (losses, token counts) in f64.
    fn all_reduce_scalars(
        &mut self,
        values: &mut [f64],
        op: ReduceOp,
    ) -> Result<(), CollectiveError>;

    /// Reduces a step's gradients and its scalars (loss sum, token counts) in one call, so the
    /// scalars need no synchronisation point of their own: the ranks meet once per step.
    fn all_reduce_with_scalars(
        &mut self,
        tensors: &mut [Tensor],
        scalars: &mut [f64],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        self.all_reduce(tensors, op)?;
        self.all_reduce_scalars(scalars, op)
    }

    /// Reduces `input` (world_size equal chunks, contiguous) across ranks; `output` (one chunk)
    /// receives this rank's chunk of the result: chunk r on rank r. `input` is scratch: its
    /// contents afterwards are unspecified (the ring reduces in it).
    fn reduce_scatter(
        &mut self,
        input: &mut Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CollectiveError>;

    /// `output` (world_size equal chunks) becomes every rank's `input` in rank order. `input`
    /// may be `output`'s own chunk of this rank (in place, as NCCL allows).
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CollectiveError>;

    /// Every rank's `tensor` becomes `root`'s.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError>;

    /// Bytes this rank has sent since the group formed, where the backend counts them (the
    /// ring does); 0 otherwise.
    fn bytes_sent(&self) -> u64 {
        0
    }
}

/// Checks that `whole` is `parts` chunks of `one`'s size (the equal chunks NCCL requires too).
pub(crate) fn check_chunks(
    whole: &Tensor,
    one: &Tensor,
    world_size: usize,
) -> Result<(), CollectiveError> {
    if whole.numel() != one.numel() * world_size {
        return Err(CollectiveError::Setup(format!(
            "{} elements are not {world_size} chunks of {}",
            whole.numel(),
            one.numel()
        )));
    }
    Ok(())
}

/// The group of one: every reduction is the identity.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _: &mut [Tensor], _: ReduceOp) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_reduce_scalars(&mut self, _: &mut [f64], _: ReduceOp) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        input: &mut Tensor,
        output: &mut Tensor,
        _: ReduceOp,
    ) -> Result<(), CollectiveError> {
        check_chunks(input, output, 1)?;
        output.copy_(&input.view_as(output));
        Ok(())
    }
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CollectiveError> {
        check_chunks(output, input, 1)?;
        output.copy_(&input.view_as(output));
        Ok(())
    }
    fn broadcast(&mut self, _: &mut Tensor, _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Splits tensors (by element count, in order) into buckets of at most `bucket_elems` elements;
/// a tensor larger than a bucket gets a bucket of its own. Returns index ranges into `sizes`.
pub fn plan_buckets(sizes: &[usize], bucket_elems: usize) -> Vec<std::ops::Range<usize>> {
    let mut buckets = Vec::new();
    let mut start = 0;
    let mut filled = 0;
    for (i, &n) in sizes.iter().enumerate() {
        if filled > 0 && filled + n > bucket_elems {
            buckets.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < sizes.len() {
        buckets.push(start..sizes.len());
    }
    buckets
}
