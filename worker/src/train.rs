//! The one training loop, top to bottom: evaluate the base model, then per optimizer step
//! LR → micro-steps (forward, backward) → reduce gradients, clip, AdamW (at the job's ZeRO
//! stage: zero/) → report → checkpoint; evaluate again; write the final checkpoint.
//!
//! Data parallelism lives only here: the model is single-device code, the collective is a trait.

use crate::checkpoint::{self, Snapshot, Staged, TrainerState, WriteJob};
use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::data::{self, DataError, Task};
use crate::model::io::{LoadedModel, SaveOptions};
use crate::model::loss::CHUNK_ELEMENTS;
use crate::model::Llama;
use crate::model::{DType, ModelError};
use crate::optim::{lr_at, AdamWConfig, OptimizerState};
use crate::precision::{ComputeCopy, Precision};
use crate::spec::{Placement, TrainSpec};
use crate::zero::Updater;
use ferrotune_data::mixture::{rank_slice, Mixture};
use ferrotune_data::Tokenizer;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind};

#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// 1-based number of the optimizer step just taken.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Learned (labelled) tokens, over all ranks.
    pub tokens: u64,
    /// Non-padding tokens read, over all ranks.
    pub input_tokens: u64,
    pub step_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskLoss {
    pub name: String,
    pub loss: f64,
    pub tokens: u64,
}

/// Held-out loss: over all datasets' held-out tokens, and per dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub tokens: u64,
    pub tasks: Vec<TaskLoss>,
}

/// What the loop is doing, for the coordinator's progress watchdog (which counts only time
/// spent training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TrainPhase {
    Loading = 0,
    Training = 1,
    Eval = 2,
    Checkpoint = 3,
}

impl TrainPhase {
    pub fn from_u8(v: u8) -> TrainPhase {
        match v {
            1 => TrainPhase::Training,
            2 => TrainPhase::Eval,
            3 => TrainPhase::Checkpoint,
            _ => TrainPhase::Loading,
        }
    }
}

/// Where the loop's results go (the coordinator, in production; a recorder in tests).
pub trait Reporter {
    /// The loop enters `phase`.
    fn phase(&self, _phase: TrainPhase) {}
    fn step(&self, stats: &StepStats);
    fn eval(&self, phase: &str, step: u64, result: &EvalResult);
    /// This rank's greedy answers to its share of the report's held-out prompts.
    fn samples(&self, _phase: &str, _samples: &[crate::report::Sample]) {}
    /// Hands a staged checkpoint (with the size and SHA-256 of every file in it) over for
    /// commit; returns the committed path.
    fn commit_checkpoint(&self, staged: &Staged) -> Result<PathBuf, String>;
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
    #[error("checkpoint: {0}")]
    Write(#[from] checkpoint::CheckpointError),
    /// The checkpoint to start from cannot be continued (a damaged file: set aside by the
    /// coordinator, and the one before taken).
    #[error("checkpoint: {0}")]
    Restore(#[from] checkpoint::RestoreError),
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

fn mean(sum: f64, count: f64) -> f64 {
    if count > 0.0 {
        sum / count
    } else {
        f64::NAN
    }
}

/// How sequences become batches on this worker.
#[derive(Debug, Clone, Copy)]
struct Batching {
    micro_batch: usize,
    seq_len: usize,
    pad_id: u32,
    device: Device,
}

/// Mean held-out loss per dataset (its first `max_sequences` held-out sequences, split over the
/// ranks) and over all of them, reduced over all ranks. None when no dataset has a held-out set.
fn evaluate(
    model: &Llama,
    tasks: &[Task],
    max_sequences: usize,
    batching: &Batching,
    collective: &mut dyn Collective,
) -> Result<Option<EvalResult>, TrainError> {
    let Batching {
        micro_batch: batch,
        seq_len,
        pad_id,
        device,
    } = *batching;
    let (rank, world) = (collective.rank(), collective.world_size());
    let with_eval: Vec<(&str, &ferrotune_data::cache::TokenCache)> = tasks
        .iter()
        .filter_map(|t| t.eval.as_ref().map(|e| (t.name.as_str(), e)))
        .collect();
    if with_eval.is_empty() {
        return Ok(None);
    }
    // [loss sum, labelled tokens] per dataset.
    let mut sums = vec![0.0f64; 2 * with_eval.len()];
    tch::no_grad(|| {
        for (i, (_, cache)) in with_eval.iter().enumerate() {
            let mine: Vec<usize> = (0..cache.len().min(max_sequences))
                .filter(|s| s % world == rank)
                .collect();
            for chunk in mine.chunks(batch.max(1)) {
                let b = data::batch(
                    &data::rows(cache, chunk.iter().copied()),
                    seq_len,
                    pad_id,
                    device,
                );
                let (loss, count) =
                    model.loss_sum_packed(&b.input_ids, &b.labels, b.packing.as_ref());
                sums[2 * i] += loss.double_value(&[]);
                sums[2 * i + 1] += count as f64;
            }
        }
    });
    collective.all_reduce_scalars(&mut sums, ReduceOp::Sum)?;
    let tasks: Vec<TaskLoss> = with_eval
        .iter()
        .enumerate()
        .map(|(i, (name, _))| TaskLoss {
            name: name.to_string(),
            loss: mean(sums[2 * i], sums[2 * i + 1]),
            tokens: sums[2 * i + 1] as u64,
        })
        .collect();
    let (loss, tokens) = sums
        .chunks(2)
        .fold((0.0, 0.0), |(l, n), c| (l + c[0], n + c[1]));
    Ok(Some(EvalResult {
        loss: mean(loss, tokens),
        tokens: tokens as u64,
        tasks,
    }))
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
                // |x| is exact in fp32 and the sum accumulates in f64: no f64 copy of a
                // (possibly multi-GB) parameter.
                p.abs().sum(Kind::Double).double_value(&[])
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
    let device = placement.device;
    // Same seed on every rank: a random init is identical everywhere.
    tch::manual_seed(spec.seed as i64);
    // A resumed job loads the checkpoint, a Hugging Face model directory like any other.
    reporter.phase(TrainPhase::Loading);
    crate::memory::mark_baseline();
    let (model, resumed) = match &placement.resume_from {
        Some(dir) => {
            checkpoint::verify(dir)?;
            let model = LoadedModel::load(dir, false, device)?;
            let state = checkpoint::restore_weights(dir, &model)?;
            (model, Some((dir, state)))
        }
        None => (
            LoadedModel::load(&spec.model_path, spec.random_init, device)?,
            None,
        ),
    };
    check_same_start(&model, collective)?;
    let tokenizer = Tokenizer::from_model_dir(&spec.model_path)?;
    let pad_id = tokenizer.special.pad.or(tokenizer.special.eos).unwrap_or(0);
    let tasks = data::load_tasks(spec, &tokenizer)?;
    let sizes: Vec<usize> = tasks.iter().map(|t| t.train.len()).collect();
    let caches: Vec<String> = tasks.iter().map(|t| t.train.name()).collect();
    let weights: Vec<f64> = tasks.iter().map(|t| t.weight).collect();
    let global_batch = placement.world_size * spec.micro_batch_size * spec.grad_accum_steps;
    for t in &tasks {
        tracing::info!(
            rank = placement.rank,
            dataset = t.name.as_str(),
            sequences = t.train.len(),
            tokens = t.train.meta.tokens,
            cache = %t.train.dir.display(),
            "data ready"
        );
    }
    // Forward and backward run on `net`: the fp32 model itself, or its bf16 compute copy.
    let compute =
        (spec.precision == Precision::Bf16).then(|| ComputeCopy::new(&model, Kind::BFloat16));
    let net: &Llama = compute.as_ref().map_or(&model.model, |c| &c.model);
    let batching = Batching {
        micro_batch: spec.micro_batch_size,
        seq_len: spec.seq_len,
        pad_id,
        device,
    };
    let run_eval = |collective: &mut dyn Collective| {
        evaluate(net, &tasks, spec.eval_max_sequences, &batching, collective)
    };
    let prompts = crate::report::prompts(spec, &tokenizer)?;
    let stop = crate::infer::stop_ids(&tokenizer, &model.config);
    let shard = (placement.rank, placement.world_size);
    let answer = |phase: &str| {
        if !prompts.is_empty() {
            let answers = crate::report::answer(
                net,
                device,
                &tokenizer,
                &prompts,
                shard,
                &stop,
                spec.seq_len,
            );
            reporter.samples(phase, &answers);
        }
    };

    // Gradient reduction, clipping and AdamW at the configured ZeRO stage (zero/).
    let mut updater = Updater::new(
        spec.zero_stage,
        model.named_parameters(),
        compute.as_ref(),
        AdamWConfig {
            beta1: spec.beta1,
            beta2: spec.beta2,
            eps: spec.eps,
            weight_decay: spec.weight_decay,
        },
        placement.rank,
        placement.world_size,
    );
    let (start, mut mixture) = match resumed {
        None => (
            0,
            Mixture::new(spec.seed, &sizes, &weights)
                .map_err(|e| TrainError::Setup(e.to_string()))?,
        ),
        Some((dir, state)) => {
            checkpoint::restore_optimizer(dir, &state, updater.state_mut())?;
            let mixture = Mixture::resume(spec.seed, &sizes, &weights, state.data_cursor)
                .map_err(|e| TrainError::Checkpoint(format!("resume: {e}")))?;
            (state.step, mixture)
        }
    };
    // Rank 0 writes the model and the trainer state; with sharded optimizer state every rank
    // also stages its own part of the optimizer.
    let is_writer = placement.rank == 0;
    let writes = is_writer || updater.state().shards().is_some();
    let mut writer = checkpoint::Writer::default();
    let periodic =
        spec.checkpoint_every_steps > 0 && spec.checkpoint_every_steps < spec.total_steps;
    if writes && periodic {
        // Paid while loading, not as a stall at the first checkpoint.
        let model = is_writer.then_some(&model);
        writer.prepare(checkpoint::Buffers::like(model, updater.state()));
    }
    let mut summary = TrainSummary {
        eval_before: None,
        eval_after: None,
        final_checkpoint: None,
        last_loss: f64::NAN,
    };

    crate::memory::reset_peak();
    reporter.phase(TrainPhase::Eval);
    if let Some(result) = run_eval(collective)? {
        // A resumed job's first eval is of the checkpoint, not of the model before fine-tuning.
        let phase = if start == 0 {
            summary.eval_before = Some(result.loss);
            "before"
        } else {
            "resumed"
        };
        if is_writer {
            reporter.eval(phase, start, &result);
        }
    }
    if start == 0 {
        answer("before");
    }

    let mut lr = spec.lr;
    // The phase stays "loading" through the first step (allocations, first-touch, caches warm
    // up): the coordinator's progress watchdog counts training time only after it.
    reporter.phase(TrainPhase::Loading);
    for step in start..spec.total_steps {
        if let Some(reason) = reporter.abort_reason() {
            return Err(TrainError::Aborted(reason));
        }
        crate::fault::at(placement.rank, step + 1);
        let started = Instant::now();
        lr = lr_at(
            step,
            spec.lr,
            spec.min_lr,
            spec.warmup_steps,
            spec.total_steps,
        );

        // Every rank draws the same global batch and takes its own slices of it.
        let slots = mixture.next_slots(global_batch);
        let batches: Vec<data::Batch> = (0..spec.grad_accum_steps)
            .map(|m| {
                let mine = rank_slice(
                    &slots,
                    placement.world_size,
                    placement.rank,
                    spec.micro_batch_size,
                    m,
                );
                let rows: Vec<_> = mine
                    .iter()
                    .map(|s| tasks[s.task].train.sequence(s.sequence))
                    .collect();
                data::batch(&rows, spec.seq_len, pad_id, device)
            })
            .collect();
        // Backward of the loss *sums*: the gradients are divided by the labelled tokens of the
        // whole global batch once they are summed over the ranks (then they are exactly the
        // gradient of the global batch's mean loss). The token counts travel with the
        // gradients, so the ranks meet once per step, not before backward as well.
        let mut local_loss_sum = 0.0;
        let mut counts = [0.0, 0.0];
        for b in &batches {
            counts[0] += b.label_count as f64;
            counts[1] += b.input_count as f64;
            let (x, y, packing) = (&b.input_ids, &b.labels, b.packing.as_ref());
            if spec.activation_checkpointing {
                local_loss_sum += net.loss_sum_backward_checkpointed(x, y, packing, 1.0);
            } else {
                // The logits in chunks: never the whole batch's (model/loss.rs).
                local_loss_sum += net.loss_sum_backward(x, y, packing, 1.0, CHUNK_ELEMENTS);
            }
        }
        let mut scalars = [local_loss_sum, counts[0], counts[1]];
        let grad_norm = updater.reduce_and_step(
            compute.as_ref(),
            &mut scalars,
            lr,
            spec.grad_clip,
            collective,
        )?;
        let [loss_sum, label_tokens, input_tokens] = scalars;
        let global_tokens = label_tokens.max(1.0);

        let stats = StepStats {
            step: step + 1,
            loss: loss_sum / global_tokens,
            lr,
            grad_norm,
            tokens: global_tokens as u64,
            input_tokens: input_tokens as u64,
            step_seconds: started.elapsed().as_secs_f64(),
        };
        summary.last_loss = stats.loss;
        if !stats.loss.is_finite() {
            return Err(TrainError::Setup(format!(
                "loss became {} at step {}; lower training.lr or enable gradient clipping",
                stats.loss, stats.step
            )));
        }
        reporter.step(&stats);
        reporter.phase(TrainPhase::Training);

        let done = step + 1;
        let checkpoint_now = spec.checkpoint_every_steps > 0
            && done.is_multiple_of(spec.checkpoint_every_steps)
            && done < spec.total_steps;
        if checkpoint_now {
            // Under bf16 sharded masters come to rank 0 (every rank takes part).
            updater.gather_for_checkpoint(collective)?;
        }
        if writes && checkpoint_now {
            // The training thread only copies the state; a background thread writes it.
            let state = (&model, updater.state(), &mixture);
            hand_over(
                &mut writer,
                reporter,
                spec,
                placement,
                state,
                &caches,
                (done, lr),
                false,
            )?;
            reporter.phase(TrainPhase::Training);
        }
        // A write that finished during this step is committed now.
        commit(writer.finished(), reporter)?;
    }

    reporter.phase(TrainPhase::Eval);
    if let Some(result) = run_eval(collective)? {
        summary.eval_after = Some(result.loss);
        if is_writer {
            reporter.eval("after", spec.total_steps, &result);
        }
    }
    answer("after");
    updater.gather_for_checkpoint(collective)?;
    if writes {
        let state = (&model, updater.state(), &mixture);
        let end = (spec.total_steps, lr);
        hand_over(
            &mut writer,
            reporter,
            spec,
            placement,
            state,
            &caches,
            end,
            true,
        )?;
        // Every part's call returns once the whole checkpoint is committed.
        let path = commit(writer.wait(), reporter)?;
        summary.final_checkpoint = is_writer.then_some(path);
    }
    Ok(summary)
}

/// Starts the checkpoint of `step`: commits the previous write (waiting for it if it still
/// runs), copies the state out into the writer's spare memory and hands it to the writer. The
/// time this takes is the training stall the commit line reports.
#[allow(clippy::too_many_arguments)]
fn hand_over(
    writer: &mut checkpoint::Writer,
    reporter: &dyn Reporter,
    spec: &TrainSpec,
    placement: &Placement,
    (model, optimizer, mixture): (&LoadedModel, &dyn OptimizerState, &Mixture),
    datasets: &[String],
    (step, lr): (u64, f64),
    is_final: bool,
) -> Result<(), TrainError> {
    let stalled = Instant::now();
    reporter.phase(TrainPhase::Checkpoint);
    commit(writer.wait(), reporter)?;
    let state = TrainerState {
        step,
        data_cursor: mixture.cursor().clone(),
        seed: spec.seed,
        world_size: placement.world_size,
        global_batch_sequences: placement.world_size
            * spec.micro_batch_size
            * spec.grad_accum_steps,
        seq_len: spec.seq_len,
        optimizer_steps: optimizer.step_count(),
        zero_stage: spec.zero_stage as u8,
        lr,
        min_lr: spec.min_lr,
        warmup_steps: spec.warmup_steps,
        total_steps: spec.total_steps,
        datasets: datasets.to_vec(),
        optimizer_shards: optimizer.shards().map(|(_, map)| map),
        chat_template_kwargs: spec.chat_template_kwargs.clone(),
    };
    let template = spec.chat_template.as_deref();
    let parts = state.optimizer_shards.as_ref().map_or(1, |m| m.files.len()) as u32;
    let files = (placement.rank == 0).then_some(model);
    let snapshot = Snapshot::take(files, optimizer, state, template, writer.take_spare());
    writer.start(write_job(
        spec,
        placement,
        model,
        snapshot,
        (is_final, parts),
        stalled,
    ))?;
    Ok(())
}

fn write_job(
    spec: &TrainSpec,
    placement: &Placement,
    model: &LoadedModel,
    snapshot: Snapshot,
    (is_final, parts): (bool, u32),
    stalled: Instant,
) -> WriteJob {
    WriteJob {
        root: spec.checkpoint_dir.clone(),
        rank: placement.rank,
        snapshot,
        model_src: spec.model_path.clone(),
        save: SaveOptions {
            dtype: spec
                .checkpoint_dtype
                .or(model.config.dtype)
                .unwrap_or(DType::F32),
            max_shard_bytes: spec.checkpoint_max_shard_bytes,
        },
        is_final,
        parts,
        stall_seconds: stalled.elapsed().as_secs_f64(),
    }
}

/// Commits a finished background write, if there is one; returns the committed path.
fn commit(
    written: Option<Result<Staged, checkpoint::CheckpointError>>,
    reporter: &dyn Reporter,
) -> Result<PathBuf, TrainError> {
    match written {
        None => Ok(PathBuf::new()),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(staged)) => reporter
            .commit_checkpoint(&staged)
            .map_err(TrainError::Checkpoint),
    }
}
