//! One process, one measurement: full training steps (forward, backward, AdamW) of a randomly
//! initialised model through the worker's own model and optimizer code, on CPU. Prints one JSON
//! line. bench/train_step.py runs it alternately with the PyTorch eager reference and prints
//! the ratio.

use clap::Parser;
use ferrotune_worker::model::io::LoadedModel;
use ferrotune_worker::optim::{AdamW, AdamWConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Args {
    /// A directory with the model's config.json.
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: i64,
    #[arg(long, default_value_t = 256)]
    seq: i64,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    threads: i32,
    #[arg(long)]
    activation_checkpointing: bool,
}

fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_maxrss as f64 / 1024.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    tch::set_num_interop_threads(1);
    tch::manual_seed(0);
    let model = LoadedModel::load(&args.model, true, Device::Cpu)?;
    let mut optimizer = AdamW::new(
        model.named_parameters(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    );
    let vocab = model.config.vocab_size;
    let mut step = || {
        let ids = Tensor::randint(
            vocab,
            [args.batch, args.seq + 1],
            (Kind::Int64, Device::Cpu),
        );
        let x = ids.narrow(1, 0, args.seq);
        let y = ids.narrow(1, 1, args.seq);
        let tokens = (args.batch * args.seq) as f64;
        if args.activation_checkpointing {
            model
                .model
                .loss_sum_backward_checkpointed(&x, &y, None, 1.0 / tokens);
        } else {
            let (loss, _) = model.model.loss_sum(&x, &y);
            (loss / tokens).backward();
        }
        optimizer.step(1e-4);
        optimizer.zero_grad();
    };
    for _ in 0..args.warmup {
        step();
    }
    let started = Instant::now();
    for _ in 0..args.steps {
        step();
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens = (args.steps as i64 * args.batch * args.seq) as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "ferrotune",
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / args.steps as f64,
            "peak_rss_mib": peak_rss_mib(),
            "activation_checkpointing": args.activation_checkpointing,
        })
    );
    Ok(())
}
