//! Control-plane scale: `--workers N` simulated workers (lightweight gRPC clients, one HTTP/2
//! connection each, not trainers) against a real coordinator started with `launcher: external`.
//! Measures the time from the first registration to every rank assigned, then heartbeat
//! latency at one heartbeat per second per worker and the coordinator's CPU meanwhile. Prints
//! one JSON line.

use clap::Parser;
use ferrotune_proto::v1 as pb;
use ferrotune_proto::v1::coordinator_client::CoordinatorClient;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    coordinator: String,
    #[arg(long)]
    token: String,
    #[arg(long)]
    workers: usize,
    /// How long to send heartbeats, after everyone is assigned.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_seconds: f64,
    /// The coordinator's pid, for its CPU time during the heartbeat phase.
    #[arg(long)]
    coordinator_pid: u32,
}

fn request<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        ferrotune_proto::TOKEN_METADATA_KEY,
        token.parse().expect("ascii token"),
    );
    r
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let endpoint =
        Endpoint::from_shared(args.coordinator.clone())?.connect_timeout(Duration::from_secs(10));
    // One connection per simulated worker, as real workers have: connected before timing.
    let mut channels: Vec<Channel> = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        channels.push(endpoint.connect().await?);
    }
    let start = Instant::now();
    let mut registrations = tokio::task::JoinSet::new();
    for (i, channel) in channels.iter().enumerate() {
        let mut client = CoordinatorClient::new(channel.clone());
        let token = args.token.clone();
        registrations.spawn(async move {
            let message = pb::RegisterRequest {
                worker_id: format!("sim-{i}"),
                host: format!("sim-host-{}", i / 8),
                local_index: (i % 8) as u32,
                devices: vec![],
                peer_address: format!("127.0.0.1:{}", 10_000 + i),
                pid: i as u32,
                worker_version: ferrotune_proto::VERSION.into(),
                ..Default::default()
            };
            let answer = client
                .register(request(message, &token))
                .await?
                .into_inner();
            let a = answer
                .assignment
                .ok_or_else(|| anyhow::anyhow!("no assignment"))?;
            anyhow::Ok((client, a.rank, a.generation))
        });
    }
    let mut clients = Vec::with_capacity(args.workers);
    while let Some(done) = registrations.join_next().await {
        clients.push(done??);
    }
    let rendezvous_seconds = start.elapsed().as_secs_f64();
    let mut ranks: Vec<u32> = clients.iter().map(|(_, r, _)| *r).collect();
    ranks.sort_unstable();
    anyhow::ensure!(
        ranks == (0..args.workers as u32).collect::<Vec<_>>(),
        "ranks are not 0..{}",
        args.workers
    );

    let cpu_before = cpu_seconds(args.coordinator_pid)?;
    let phase = Instant::now();
    let length = Duration::from_secs_f64(args.heartbeat_seconds);
    let mut beats = tokio::task::JoinSet::new();
    for (i, (mut client, rank, generation)) in clients.into_iter().enumerate() {
        let token = args.token.clone();
        let n = args.workers;
        beats.spawn(async move {
            // Spread evenly over the second, as independent workers are.
            let offset = Duration::from_secs_f64(i as f64 / n as f64);
            let mut ticker = tokio::time::interval_at(
                tokio::time::Instant::now() + offset,
                Duration::from_secs(1),
            );
            let mut latencies = Vec::new();
            while phase.elapsed() < length {
                ticker.tick().await;
                let message = pb::HeartbeatRequest {
                    rank,
                    generation,
                    step: 0,
                    phase: pb::WorkerPhase::Training as i32,
                    ..Default::default()
                };
                let sent = Instant::now();
                let answer = client
                    .heartbeat(request(message, &token))
                    .await?
                    .into_inner();
                latencies.push(sent.elapsed().as_secs_f64());
                anyhow::ensure!(
                    answer.command == pb::Command::Continue as i32,
                    "told to stop: {}",
                    answer.reason
                );
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = beats.join_next().await {
        latencies.extend(done??);
    }
    let wall = phase.elapsed().as_secs_f64();
    let cpu = cpu_seconds(args.coordinator_pid)? - cpu_before;
    latencies.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "workers": args.workers,
            "rendezvous_seconds": rendezvous_seconds,
            "heartbeats": latencies.len(),
            "heartbeat_p50_seconds": percentile(&latencies, 0.5),
            "heartbeat_p99_seconds": percentile(&latencies, 0.99),
            "coordinator_cpu_fraction": cpu / wall,
        })
    );
    Ok(())
}
