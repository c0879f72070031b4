//! The one training loop, top to bottom: evaluate the base model, then per optimizer step
//! LR → micro-steps (forward, backward) → gradient all-reduce → clip → AdamW → report →
//! checkpoint; evaluate again; write the final checkpoint.
//!
//! Data parallelism lives only here: the model is single-device code, the collective is a trait.

use crate::checkpoint::{self, TrainerState};
use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::data::text::read_jsonl_texts;
use crate::data::{DataError, Sampler, TokenWindows};
use crate::model::io::{LoadedModel, SaveOptions};
use crate::model::{DType, ModelError};
use crate::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig};
use crate::spec::{Placement, TrainSpec};
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// 1-based number of the optimizer step just taken.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub step_seconds: f64,
}

/// Where the loop's results go (the coordinator, in production; a recorder in tests).
pub trait Reporter {
    fn step(&self, stats: &StepStats);
    fn eval(&self, phase: &str, step: u64, loss: f64, tokens: u64);
    /// Hands a staged checkpoint over for commit; returns the committed path.
    fn commit_checkpoint(
        &self,
        step: u64,
        staging: &Path,
        is_final: bool,
    ) -> Result<PathBuf, String>;
    /// Some(reason) when the loop must stop (the coordinator said so, or is gone).
    fn abort_reason(&self) -> Option<String>;
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Setup(String),
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("stopped: {0}")]
    Aborted(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub final_checkpoint: Option<PathBuf>,
    pub last_loss: f64,
}

fn load_windows(
    path: &Path,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
    seq_len: usize,
) -> Result<TokenWindows, TrainError> {
    let texts = read_jsonl_texts(path)?;
    TokenWindows::from_texts(&texts, tokenizer, eos, seq_len)
        .map_err(|e| TrainError::Setup(format!("{}: tokenizing: {e}", path.display())))
}

/// Mean loss over (a rank-sharded part of) the held-out windows, reduced over all ranks.
fn evaluate(
    model: &LoadedModel,
    windows: &TokenWindows,
    max_sequences: usize,
    batch: usize,
    collective: &mut dyn Collective,
) -> Result<(f64, u64), TrainError> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let mine: Vec<usize> = (0..windows.len().min(max_sequences))
        .filter(|i| i % world == rank)
        .collect();
    let mut sums = [0.0f64, 0.0f64];
    tch::no_grad(|| {
        for chunk in mine.chunks(batch.max(1)) {
            let (x, y) = windows.batch(chunk, Device::Cpu);
            let (loss, count) = model.model.loss_sum(&x, &y);
            sums[0] += loss.double_value(&[]);
            sums[1] += count as f64;
        }
    });
    collective.all_reduce_scalars(&mut sums, ReduceOp::Sum)?;
    let mean = if sums[1] > 0.0 {
        sums[0] / sums[1]
    } else {
        f64::NAN
    };
    Ok((mean, sums[1] as u64))
}

/// All ranks must start from the same weights (seeded init or the same file). A cheap guard:
/// the rank-mean of a weight checksum equals each rank's own.
fn check_same_start(
    model: &LoadedModel,
    collective: &mut dyn Collective,
) -> Result<(), TrainError> {
    let local: f64 = tch::no_grad(|| {
        model
            .named_parameters()
            .iter()
            .map(|(_, p)| {
                p.to_kind(Kind::Double)
                    .abs()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum()
    });
    let mut mean = [local];
    collective.all_reduce_scalars(&mut mean, ReduceOp::Mean)?;
    if (mean[0] - local).abs() > 1e-9 * local.abs().max(1.0) {
        return Err(TrainError::Setup(format!(
            "rank {} starts from different weights than the others (checksum {local} vs mean {})",
            collective.rank(),
            mean[0]
        )));
    }
    Ok(())
}

pub fn run(
    spec: &TrainSpec,
    placement: &Placement,
    collective: &mut dyn Collective,
    reporter: &dyn Reporter,
) -> Result<TrainSummary, TrainError> {
    let device = Device::Cpu;
    // Same seed on every rank: a random init is identical everywhere.
    tch::manual_seed(spec.seed as i64);
    let model = LoadedModel::load(&spec.model_path, spec.random_init, device)?;
    check_same_start(&model, collective)?;
    let tokenizer = Tokenizer::from_model_dir(&spec.model_path, &model.config)?;
    let eos = tokenizer.special.eos;
    let train = load_windows(&spec.train_path, &tokenizer, eos, spec.seq_len)?;
    let eval = match &spec.eval_path {
        Some(p) => Some(load_windows(p, &tokenizer, eos, spec.seq_len)?),
        None => None,
    };
    let mut sampler = Sampler::new(
        train.len(),
        spec.seed,
        placement.world_size,
        placement.rank,
        spec.micro_batch_size,
        spec.grad_accum_steps,
    )
    .map_err(|e| TrainError::Setup(format!("{}: {e}", spec.train_path.display())))?;
    tracing::info!(
        rank = placement.rank,
        windows = train.len(),
        tokens = train.total_tokens(),
        steps_per_epoch = sampler.steps_per_epoch(),
        "data ready"
    );

    let mut optimizer = AdamW::new(
        model.named_parameters(),
        AdamWConfig {
            beta1: spec.beta1,
            beta2: spec.beta2,
            eps: spec.eps,
            weight_decay: spec.weight_decay,
        },
    );
    let is_writer = placement.rank == 0;
    let mut summary = TrainSummary {
        eval_before: None,
        eval_after: None,
        final_checkpoint: None,
        last_loss: f64::NAN,
    };

    if let Some(windows) = &eval {
        let (loss, tokens) = evaluate(
            &model,
            windows,
            spec.eval_max_sequences,
            spec.micro_batch_size,
            collective,
        )?;
        summary.eval_before = Some(loss);
        if is_writer {
            reporter.eval("before", 0, loss, tokens);
        }
    }

    let mut lr = spec.lr;
    for step in 0..spec.total_steps {
        if let Some(reason) = reporter.abort_reason() {
            return Err(TrainError::Aborted(reason));
        }
        let started = Instant::now();
        lr = lr_at(
            step,
            spec.lr,
            spec.min_lr,
            spec.warmup_steps,
            spec.total_steps,
        );

        let batches: Vec<(Tensor, Tensor)> = (0..spec.grad_accum_steps)
            .map(|m| train.batch(&sampler.micro_batch_indices(step, m), device))
            .collect();
        // Divide by the labelled tokens of the whole global batch, not per rank: then summing
        // the ranks' gradients gives exactly the gradient of the global batch's mean loss.
        let local_tokens: i64 = batches
            .iter()
            .map(|(_, y)| {
                y.ne(crate::model::llama::IGNORE_INDEX)
                    .sum(Kind::Int64)
                    .int64_value(&[])
            })
            .sum();
        let mut counts = [local_tokens as f64];
        collective.all_reduce_scalars(&mut counts, ReduceOp::Sum)?;
        let global_tokens = counts[0].max(1.0);

        let mut local_loss_sum = 0.0;
        for (x, y) in &batches {
            if spec.activation_checkpointing {
                local_loss_sum +=
                    model
                        .model
                        .loss_sum_backward_checkpointed(x, y, 1.0 / global_tokens);
            } else {
                let (loss_sum, _) = model.model.loss_sum(x, y);
                local_loss_sum += loss_sum.double_value(&[]);
                (loss_sum / global_tokens).backward();
            }
        }
        let mut grads = optimizer.gradients();
        collective.all_reduce(&mut grads, ReduceOp::Sum)?;
        let grad_norm = clip_grad_norm(&grads, spec.grad_clip);
        optimizer.step(lr);
        optimizer.zero_grad();

        let mut loss = [local_loss_sum];
        collective.all_reduce_scalars(&mut loss, ReduceOp::Sum)?;
        let stats = StepStats {
            step: step + 1,
            loss: loss[0] / global_tokens,
            lr,
            grad_norm,
            tokens: global_tokens as u64,
            step_seconds: started.elapsed().as_secs_f64(),
        };
        summary.last_loss = stats.loss;
        if !stats.loss.is_finite() {
            return Err(TrainError::Setup(format!(
                "loss became {} at step {}; lower training.lr or enable gradient clipping",
                stats.loss, stats.step
            )));
        }
        if is_writer {
            reporter.step(&stats);
        }

        let done = step + 1;
        if is_writer
            && spec.checkpoint_every_steps > 0
            && done.is_multiple_of(spec.checkpoint_every_steps)
            && done < spec.total_steps
        {
            save(
                spec, placement, &model, &optimizer, &sampler, done, lr, false, reporter,
            )?;
        }
    }

    if let Some(windows) = &eval {
        let (loss, tokens) = evaluate(
            &model,
            windows,
            spec.eval_max_sequences,
            spec.micro_batch_size,
            collective,
        )?;
        summary.eval_after = Some(loss);
        if is_writer {
            reporter.eval("after", spec.total_steps, loss, tokens);
        }
    }
    if is_writer {
        let path = save(
            spec,
            placement,
            &model,
            &optimizer,
            &sampler,
            spec.total_steps,
            lr,
            true,
            reporter,
        )?;
        summary.final_checkpoint = Some(path);
    }
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn save(
    spec: &TrainSpec,
    placement: &Placement,
    model: &LoadedModel,
    optimizer: &AdamW,
    sampler: &Sampler,
    step: u64,
    lr: f64,
    is_final: bool,
    reporter: &dyn Reporter,
) -> Result<PathBuf, TrainError> {
    let (epoch, step_in_epoch) = sampler.cursor(step);
    let state = TrainerState {
        step,
        epoch,
        step_in_epoch,
        seed: spec.seed,
        world_size: placement.world_size,
        global_batch_sequences: sampler.global_batch(),
        seq_len: spec.seq_len,
        optimizer_steps: optimizer.step_count(),
        lr,
        min_lr: spec.min_lr,
        warmup_steps: spec.warmup_steps,
        total_steps: spec.total_steps,
    };
    let options = SaveOptions {
        dtype: spec
            .checkpoint_dtype
            .or(model.config.dtype)
            .unwrap_or(DType::F32),
        max_shard_bytes: spec.checkpoint_max_shard_bytes,
    };
    let staging = checkpoint::write_staging(
        &spec.checkpoint_dir,
        placement.rank,
        model,
        &spec.model_path,
        &options,
        optimizer,
        &state,
    )
    .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    reporter
        .commit_checkpoint(step, &staging, is_final)
        .map_err(TrainError::Checkpoint)
}
