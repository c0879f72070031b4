//! One process, one measurement: full training steps (forward, backward, gradient reduction,
//! clip, AdamW at a ZeRO stage) of a randomly initialised model through the worker's own model,
//! collective and update code (`zero::Updater`, as the trainer calls it): on the CPU (the ring),
//! or on GPU 0 with NCCL (bench/gpu.sh). Prints one JSON line (rank 0). bench/run.py runs it
//! alternately with the PyTorch eager reference (`train_step`), as 1 and 2 ranks over the TCP
//! ring against torch DDP over Gloo (`ddp_overhead`), and at ZeRO stages 0/1/2 (`zero`).

use clap::Parser;
use ferrotune_worker::collective::nccl::{self, Nccl, NcclOptions};
use ferrotune_worker::collective::ring::{Ring, RingOptions};
use ferrotune_worker::collective::{Collective, SingleProcess};
use ferrotune_worker::model::io::LoadedModel;
use ferrotune_worker::optim::AdamWConfig;
use ferrotune_worker::precision::ComputeCopy;
use ferrotune_worker::zero::{Stage, Updater};
use std::time::{Duration, Instant};
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
    /// This process's rank, with --ports: data parallelism over the worker's TCP ring.
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Loopback ports of all ranks, in rank order, comma-separated (none: one process).
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    /// cpu, or cuda (GPU 0; gradients go through NCCL at world size 1, as a one-GPU job's do).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, or bf16 (bf16 compute copy, fp32 masters and AdamW state: `model.precision`).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// 0, 1 or 2: `training.zero_stage`.
    #[arg(long, default_value_t = 0)]
    zero_stage: u8,
}

fn collective(args: &Args, device: Device) -> anyhow::Result<Box<dyn Collective>> {
    if device != Device::Cpu {
        let options = NcclOptions {
            timeout: Duration::from_secs(120),
            abort: Default::default(),
        };
        let id = nccl::unique_id()?;
        return Ok(Box::new(Nccl::connect(&id, 0, 1, device, options)?));
    }
    if args.ports.len() < 2 {
        return Ok(Box::new(SingleProcess));
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", args.ports[args.rank]))?;
    let next = format!(
        "127.0.0.1:{}",
        args.ports[(args.rank + 1) % args.ports.len()]
    );
    let options = RingOptions {
        timeout: Duration::from_secs(120),
        // The trainer's default bucket (25 MB), as torch DDP's.
        bucket_bytes: 25_000_000,
        token: "bench".into(),
        generation: 1,
        cancel: Default::default(),
    };
    Ok(Box::new(Ring::connect(
        listener,
        args.rank,
        args.ports.len(),
        &next,
        &options,
    )?))
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

/// Device memory in use (the driver's total minus free: libtorch's cache and the context), in
/// MiB; 0 on the CPU. PyTorch's side of the benchmark reads the same quantity.
fn device_used_mib(device: Device) -> f64 {
    if device == Device::Cpu {
        return 0.0;
    }
    cudarc::driver::result::mem_get_info()
        .map(|(free, total)| (total - free) as f64 / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    tch::set_num_interop_threads(1);
    let device = ferrotune_worker::device::choose(&args.device, 0)?;
    let mut collective = collective(&args, device)?;
    tch::manual_seed(0);
    let model = LoadedModel::load(&args.model, true, device)?;
    let bf16 = match args.precision.as_str() {
        "fp32" => false,
        "bf16" => true,
        other => anyhow::bail!("--precision {other}: expected fp32 or bf16"),
    };
    let Some(stage) = Stage::from_number(args.zero_stage.into()) else {
        anyhow::bail!("--zero-stage {}: expected 0, 1 or 2", args.zero_stage);
    };
    let parameters: i64 = model
        .named_parameters()
        .iter()
        .map(|(_, p)| p.numel() as i64)
        .sum();
    let compute = bf16.then(|| ComputeCopy::new(&model, Kind::BFloat16));
    let net = compute.as_ref().map_or(&model.model, |c| &c.model);
    let mut updater = Updater::new(
        stage,
        model.named_parameters(),
        compute.as_ref(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        args.rank,
        args.ports.len().max(1),
    );
    let vocab = model.config.vocab_size;
    // Each rank draws its own batch (its data-parallel share).
    tch::manual_seed(1 + args.rank as i64);
    let mut peak_device_mib = 0.0f64;
    let mut gradient_bytes = 0u64;
    // Returns the seconds inside the gradient reduction: the communication share of a step.
    let mut step = || -> anyhow::Result<f64> {
        let ids = Tensor::randint(vocab, [args.batch, args.seq + 1], (Kind::Int64, device));
        let x = ids.narrow(1, 0, args.seq);
        let y = ids.narrow(1, 1, args.seq);
        let loss_sum = if args.activation_checkpointing {
            net.loss_sum_backward_checkpointed(&x, &y, None, 1.0)
        } else {
            let (loss, _) = net.loss_sum(&x, &y);
            let value = loss.double_value(&[]);
            loss.backward();
            value
        };
        let tokens = (args.batch * args.seq) as f64;
        let mut scalars = [loss_sum, tokens, tokens];
        updater.reduce_and_step(
            compute.as_ref(),
            &mut scalars,
            1e-4,
            1.0,
            collective.as_mut(),
        )?;
        gradient_bytes = updater.last_gradient_bytes;
        peak_device_mib = peak_device_mib.max(device_used_mib(device));
        Ok(updater.last_reduce_seconds)
    };
    let synchronize = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..args.warmup {
        step()?;
    }
    synchronize();
    let started = Instant::now();
    let mut reducing = 0.0;
    for _ in 0..args.steps {
        reducing += step()?;
    }
    synchronize();
    let seconds = started.elapsed().as_secs_f64();
    let tokens = (args.steps as i64 * args.batch * args.seq) as f64;
    if args.rank != 0 {
        return Ok(());
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "ferrotune",
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / args.steps as f64,
            "peak_rss_mib": peak_rss_mib(),
            "activation_checkpointing": args.activation_checkpointing,
            "world_size": args.ports.len().max(1),
            "allreduce_s": reducing / args.steps as f64,
            "zero_stage": args.zero_stage,
            "gradient_bytes_per_step": gradient_bytes,
            "device": args.device,
            "precision": args.precision,
            "parameters": parameters,
            "peak_device_mib": peak_device_mib,
        })
    );
    Ok(())
}
