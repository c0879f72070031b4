//! `worker run`: bind the collective's port, register, heartbeat, train, report the outcome.

use crate::agent::{heartbeat_loop, Agent, GrpcReporter, Identity};
use crate::collective::ring::{Ring, RingOptions};
use crate::train;
use anyhow::Context;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct RunArgs {
    pub coordinator: String,
    pub token: String,
    pub worker_id: String,
    pub host: String,
    pub local_index: u32,
    /// Address the collective listens on.
    pub bind: String,
    /// Address peers should dial (defaults to `bind`).
    pub advertise: Option<String>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bound before registering, so the peer address we announce already accepts connections.
    let listener = std::net::TcpListener::bind((args.bind.as_str(), 0))
        .with_context(|| format!("binding the collective on {}", args.bind))?;
    let port = listener.local_addr()?.port();
    let peer_address = format!("{}:{port}", args.advertise.as_deref().unwrap_or(&args.bind));

    let agent = runtime.block_on(Agent::connect(
        &args.coordinator,
        &args.token,
        Duration::from_secs(30),
    ))?;
    let me = Identity {
        worker_id: args.worker_id.clone(),
        host: args.host.clone(),
        local_index: args.local_index,
        peer_address,
    };
    let (placement, spec) = runtime
        .block_on(agent.register(&me))
        .context("registering with the coordinator")?;
    tracing::info!(
        rank = placement.rank,
        world_size = placement.world_size,
        generation = placement.generation,
        "joined the job"
    );

    let threads = if spec.intra_op_threads > 0 {
        spec.intra_op_threads
    } else {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / placement.local_world_size.max(1)).max(1)
    };
    tch::set_num_threads(threads as i32);
    tch::set_num_interop_threads(1);

    let abort = Arc::new(Mutex::new(None));
    let current_step = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let give_up = (spec.heartbeat_interval * 10).max(Duration::from_secs(15));
    runtime.spawn(heartbeat_loop(
        agent.clone(),
        placement.clone(),
        spec.heartbeat_interval,
        give_up,
        abort.clone(),
        current_step.clone(),
    ));

    let outcome = (|| -> anyhow::Result<()> {
        let options = RingOptions {
            timeout: spec.collective_timeout,
            bucket_bytes: spec.bucket_bytes,
            token: args.token.clone(),
            generation: placement.generation,
        };
        let mut ring = Ring::connect(
            listener,
            placement.rank,
            &placement.peer_addresses,
            &options,
        )?;
        let reporter = GrpcReporter {
            runtime: runtime.handle().clone(),
            agent: agent.clone(),
            placement: placement.clone(),
            abort: abort.clone(),
            current_step: current_step.clone(),
        };
        let summary = train::run(&spec, &placement, &mut ring, &reporter)?;
        tracing::info!(last_loss = summary.last_loss, "training finished");
        Ok(())
    })();

    let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
    if let Err(e) = runtime.block_on(agent.finish(placement.rank, placement.generation, error)) {
        tracing::warn!("could not report the outcome to the coordinator: {e}");
    }
    outcome
}
