//! One process, one measurement: full training steps (forward, backward, gradient all-reduce,
//! clip, AdamW) of a randomly initialised model through the worker's own model, gradient,
//! collective and optimizer code, in the order the trainer runs them: on the CPU (the ring), or
//! on GPU 0 with NCCL (bench/gpu.sh). Prints one JSON line (rank 0). bench/run.py runs it alternately with the PyTorch eager reference
//! (`train_step`), and as 1 and 2 ranks over the TCP ring against torch DDP over Gloo
//! (`ddp_overhead`).

use clap::Parser;
use ferrotune_worker::collective::nccl::{self, Nccl, NcclOptions};
use ferrotune_worker::collective::ring::{Ring, RingOptions};
use ferrotune_worker::collective::{Collective, ReduceOp, SingleProcess};
use ferrotune_worker::grads::FlatGrads;
use ferrotune_worker::model::io::LoadedModel;
use ferrotune_worker::optim::{scale_and_clip, AdamW, AdamWConfig};
use ferrotune_worker::precision::ComputeCopy;
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
    let compute = bf16.then(|| ComputeCopy::new(&model, Kind::BFloat16));
    let net = compute.as_ref().map_or(&model.model, |c| &c.model);
    let mut optimizer = AdamW::new(
        model.named_parameters(),
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    );
    let parameters = optimizer.parameters();
    let flat = FlatGrads::new(&parameters);
    let vocab = model.config.vocab_size;
    // Each rank draws its own batch (its data-parallel share).
    tch::manual_seed(1 + args.rank as i64);
    let mut in_place = false;
    let mut peak_device_mib = 0.0f64;
    // Returns the seconds inside the all-reduce: the communication share of a step.
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
        let mut grads = match &compute {
            Some(c) => flat.upcast_from(c),
            None => {
                let adopted = flat.adopt(&parameters);
                in_place = adopted.is_some();
                adopted.unwrap_or_else(|| optimizer.gradients())
            }
        };
        let mut scalars = [loss_sum, (args.batch * args.seq) as f64];
        let reduce_started = Instant::now();
        collective.all_reduce_with_scalars(&mut grads, &mut scalars, ReduceOp::Sum)?;
        let reducing = reduce_started.elapsed().as_secs_f64();
        scale_and_clip(&grads, 1.0 / scalars[1], 1.0);
        match &compute {
            Some(c) => {
                optimizer.step_with(1e-4, &grads);
                c.sync();
            }
            None => optimizer.step(1e-4),
        }
        optimizer.zero_grad();
        peak_device_mib = peak_device_mib.max(device_used_mib(device));
        Ok(reducing)
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
    let parameters: i64 = model
        .named_parameters()
        .iter()
        .map(|(_, p)| p.numel() as i64)
        .sum();
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
            "gradients_reduced_in_place": in_place,
            "device": args.device,
            "precision": args.precision,
            "parameters": parameters,
            "peak_device_mib": peak_device_mib,
        })
    );
    Ok(())
}
