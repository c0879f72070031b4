//! `worker run --coordinator URL ...`: one rank of a ferrotune job. Normally started by a
//! launcher, which passes the job token in FERROTUNE_JOB_TOKEN.

use clap::{Parser, Subcommand};
use ferrotune_worker::run::{run, RunArgs};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "ferrotune worker: one data-parallel rank"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a job and train.
    Run {
        /// Coordinator gRPC endpoint, e.g. http://10.0.0.5:50051.
        #[arg(long)]
        coordinator: String,
        /// Launcher-given identity, stable across restarts.
        #[arg(long)]
        worker_id: String,
        /// Host name used to order ranks (default: this machine's host name).
        #[arg(long)]
        host: Option<String>,
        /// This worker's index among the workers of its host.
        #[arg(long, default_value_t = 0)]
        local_index: u32,
        /// Address the gradient collective listens on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// Address peers dial to reach this worker (default: --bind).
        #[arg(long)]
        advertise: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            coordinator,
            worker_id,
            host,
            local_index,
            bind,
            advertise,
        } => {
            let Ok(token) = std::env::var(ferrotune_proto::TOKEN_ENV) else {
                eprintln!(
                    "error: {} is not set: the launcher passes the job token to each worker",
                    ferrotune_proto::TOKEN_ENV
                );
                return ExitCode::from(2);
            };
            let host = host.unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into())
            });
            let args = RunArgs {
                coordinator,
                token,
                worker_id,
                host,
                local_index,
                bind,
                advertise,
            };
            match run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
