//! One rank of the all-reduce benchmark: the worker's TCP ring on loopback, float32, summing a
//! tensor of the given size. Every rank starts each timed all-reduce together (a scalar
//! all-reduce as barrier); rank 0 prints one JSON line with the seconds of each. bench/run.py
//! starts the ranks and compares them with torch.distributed's Gloo (bench/torch_allreduce.py).

use clap::Parser;
use ferrotune_worker::collective::ring::{Ring, RingOptions};
use ferrotune_worker::collective::{Collective, ReduceOp};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    rank: usize,
    /// Loopback ports of all ranks, in rank order, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ports: Vec<u16>,
    /// Tensor size in MiB of float32.
    #[arg(long)]
    mib: f64,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// The ring's bucket size (the training default is 25 MB).
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(1);
    let listener = std::net::TcpListener::bind(("127.0.0.1", args.ports[args.rank]))?;
    let peers: Vec<String> = args
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let options = RingOptions {
        timeout: Duration::from_secs(60),
        bucket_bytes: (args.bucket_mb * 1e6) as usize,
        token: "bench".into(),
        generation: 1,
        cancel: Default::default(),
    };
    let next = &peers[(args.rank + 1) % peers.len()];
    let mut ring = Ring::connect(listener, args.rank, peers.len(), next, &options)?;
    let n = (args.mib * 1024.0 * 1024.0 / 4.0) as i64;
    let mut tensors = [Tensor::ones([n], (Kind::Float, Device::Cpu))];
    let mut seconds = Vec::new();
    for i in 0..args.warmup + args.iters {
        ring.all_reduce_scalars(&mut [0.0], ReduceOp::Sum)?;
        let start = Instant::now();
        ring.all_reduce(&mut tensors, ReduceOp::Sum)?;
        if i >= args.warmup {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    // Correctness guard: a benchmark of a wrong sum measures nothing.
    let expected = (args.ports.len() as f64).powi((args.warmup + args.iters) as i32);
    let got = tensors[0].double_value(&[0]);
    anyhow::ensure!(
        (got - expected).abs() <= expected * 1e-6,
        "all-reduce result {got}, expected {expected}"
    );
    if args.rank == 0 {
        println!("{}", serde_json::json!({ "seconds": seconds }));
    }
    Ok(())
}
