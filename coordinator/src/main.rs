//! `coordinator launch|validate cluster.yaml`.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferrotune_coordinator::{
    checkpoint, config, datacheck, driver, endpoint, job::Outcome, launcher, lease, observe, plan,
    resolve_worker_binary, resume, status,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "ferrotune control plane: distributed full fine-tuning"
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config, start the workers and run the fine-tuning job.
    Launch {
        config: PathBuf,
        /// Continue from a committed checkpoint: its weights, optimizer state, step and data
        /// position. Without a value: the newest one under checkpoint.dir.
        #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = resume::LATEST)]
        resume: Option<String>,
        /// Memory one worker may use (GPU memory on a CUDA job), e.g. 80GiB: the job is refused
        /// when the estimate (`coordinator plan`) exceeds it. Default for local CPU workers: this
        /// host's available memory shared among them.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        device_memory: Option<u64>,
        /// Start even when the memory estimate says the job does not fit.
        #[arg(long)]
        ignore_fit: bool,
    },
    /// Serve the dashboard of a job from its history (a finished job, or one running
    /// elsewhere) until Ctrl-C.
    Dashboard {
        /// A cluster.yaml or a checkpoint.dir.
        target: PathBuf,
        /// Where to serve the page.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Write the eval report (held-out loss before/after, the base and fine-tuned models'
    /// answers) into the newest committed checkpoint again, from <checkpoint.dir>/metrics.jsonl.
    Report {
        /// A cluster.yaml or a checkpoint.dir.
        target: PathBuf,
    },
    /// Estimate each worker's memory, term by term, and whether it fits; starts nothing.
    Plan {
        config: PathBuf,
        /// Memory one worker may use (GPU memory on a CUDA job), e.g. 80GiB.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        device_memory: Option<u64>,
        /// The plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a config and every line of its datasets without starting anything.
    Validate { config: PathBuf },
    /// Check rendered Kubernetes manifests (`kubectl kustomize DIR | coordinator
    /// check-deployment -`): world size, the config and token they mount, ports, shared storage.
    CheckDeployment {
        /// A file of rendered manifests, or - for standard input.
        manifests: PathBuf,
    },
    /// Summarise a running or finished job: live from its dashboard when it answers, else from
    /// <checkpoint.dir>/metrics.jsonl and its checkpoints.
    Status {
        /// A cluster.yaml, a checkpoint.dir, or a dashboard URL (http://HOST:PORT/).
        target: String,
        /// The full status as JSON (the same fields as /api/status).
        #[arg(long)]
        json: bool,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    config::parse_size(text)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{text}`: expected a size such as 80GiB, 16GB or 512MiB"))
}

const EXIT_FAILED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &Path, purpose: config::Purpose) -> Result<config::JobConfig, ExitCode> {
    config::load(path, purpose).map_err(|e| {
        eprintln!("error: invalid job config\n{e}");
        ExitCode::from(EXIT_BAD_INPUT)
    })
}

/// Prints the dataset summary; Err(exit code) when a dataset has errors or cannot be read.
fn check_data(config: &config::JobConfig, build: bool) -> Result<datacheck::Summary, ExitCode> {
    match datacheck::run(config, build) {
        Ok(summary) => {
            println!("{summary}");
            if summary.ok() {
                Ok(summary)
            } else {
                eprintln!("error: the datasets have errors (listed above as file:line); fix or remove those lines");
                Err(ExitCode::from(EXIT_BAD_INPUT))
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EXIT_BAD_INPUT))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Status { target, json } => status(&target, json),
        Command::Report { target } => report(&target),
        Command::Dashboard { target, listen } => dashboard(&target, listen),
        Command::CheckDeployment { manifests } => check_deployment(&manifests),
        Command::Validate { config } => {
            let c = match load(&config, config::Purpose::Validate) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(code) = check_data(&c, false) {
                return code;
            }
            let workers = if c.cluster.world_size_deferred {
                "world_size auto: the allocation's task count at launch".to_string()
            } else {
                format!("{} workers", c.cluster.world_size)
            };
            println!(
                "{}: ok (job {}, {workers}, {} steps)",
                config.display(),
                c.name,
                c.steps
            );
            ExitCode::SUCCESS
        }
        Command::Plan {
            config,
            device_memory,
            json,
        } => {
            let c = match load(&config, config::Purpose::Validate) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match plan::Plan::for_job(&c, device_memory) {
                Ok(p) if json => {
                    let mut v = serde_json::to_value(&p).unwrap_or_default();
                    v["fits"] = serde_json::Value::Bool(p.check().is_ok());
                    println!("{v:#}");
                    ExitCode::SUCCESS
                }
                Ok(p) => {
                    println!("{p}");
                    ExitCode::SUCCESS
                }
                Err(e) => bad_input(e, "point model.path at a Hugging Face model directory"),
            }
        }
        Command::Launch {
            config,
            resume,
            device_memory,
            ignore_fit,
        } => {
            let mut c = match load(&config, config::Purpose::Launch) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if !ignore_fit {
                // An estimate that cannot be made is no reason to refuse: the worker reads the
                // model config itself and says what is wrong with it.
                if let Ok(Err(reason)) = plan::Plan::for_job(&c, device_memory).map(|p| p.check()) {
                    return bad_input(
                        reason,
                        "or start anyway with --ignore-fit (the estimate may overstate)",
                    );
                }
            }
            // Everything that can be refused without reading data comes first.
            let mut startup = match prepare_startup(&c) {
                Ok(s) => s,
                Err(code) => return code,
            };
            // With --device-memory the fit was checked above; else against the GPUs reported.
            if !ignore_fit && device_memory.is_none() {
                startup.gpu_need = plan::Plan::gpu_need(&c);
            }
            // `resume: auto` (a restarted coordinator) continues the job when a checkpoint of
            // it exists, and keeps its restart count; a person's `--resume` starts counting anew.
            let auto = resume.is_none()
                && c.cluster.resume == config::ResumeSetting::Auto
                && !checkpoint::committed(&c.checkpoint_dir).is_empty();
            let requested = resume.or_else(|| auto.then(|| resume::LATEST.to_string()));
            if let Some(requested) = requested {
                match resume::choose(&c, &requested) {
                    Ok(r) => {
                        c.resume = Some(r);
                        c.resume_keeps_restarts = auto;
                    }
                    Err(message) => {
                        eprintln!("error: {message}");
                        return ExitCode::from(EXIT_BAD_INPUT);
                    }
                }
            }
            let summary = match check_data(&c, true) {
                Ok(s) => s,
                Err(code) => return code,
            };
            if let Some(r) = &c.resume {
                for i in resume::changed_datasets(r, &summary.train_caches) {
                    eprintln!(
                        "warning: dataset {} is not the data {} was trained on (its bytes, the tokenizer or the data options changed); training continues, but not in the order the interrupted run would have taken",
                        c.data.datasets[i].name,
                        r.dir.display()
                    );
                }
            }
            match launch(c, startup) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
    }
}

fn status(target: &str, as_json: bool) -> ExitCode {
    let found = if target.starts_with("http://") || target.starts_with("https://") {
        status::live(target)
    } else {
        let path = Path::new(target);
        if !path.is_file() && !path.is_dir() {
            return bad_input(
                format!("{target} is neither a file, a directory nor a URL"),
                "name the job's cluster.yaml, its checkpoint.dir, or its dashboard URL",
            );
        }
        match checkpoint_dir_of(path) {
            Ok(dir) => status::of_dir(&dir),
            Err(code) => return code,
        }
    };
    match found {
        Ok(s) if as_json => {
            println!("{s:#}");
            ExitCode::SUCCESS
        }
        Ok(s) => {
            println!("{}", status::summary(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The checkpoint.dir a command names: a cluster.yaml's, or the directory itself.
fn checkpoint_dir_of(target: &Path) -> Result<PathBuf, ExitCode> {
    if target.is_file() {
        load(target, config::Purpose::Validate).map(|c| c.checkpoint_dir)
    } else {
        Ok(target.to_path_buf())
    }
}

fn dashboard(target: &Path, listen: std::net::SocketAddr) -> ExitCode {
    let dir = match checkpoint_dir_of(target) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if !dir.join(observe::history::FILE).is_file() {
        return bad_input(
            format!("{} has no {}", dir.display(), observe::history::FILE),
            "name the job's cluster.yaml or its checkpoint.dir",
        );
    }
    let listener = match endpoint::bind_observer(listen) {
        Ok(l) => l,
        Err(e) => return bad_input(&e, "pass a free --listen address"),
    };
    match listener.local_addr() {
        Ok(addr) => println!("dashboard: http://{addr}/ (history of {})", dir.display()),
        Err(e) => eprintln!("warning: {e}"),
    }
    match observe::serve_history(dir, listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn report(target: &Path) -> ExitCode {
    let dir = match checkpoint_dir_of(target) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let Some((_, newest)) = checkpoint::committed(&dir).pop() else {
        return bad_input(
            format!("{} has no committed checkpoint", dir.display()),
            "name the job's cluster.yaml or its checkpoint.dir",
        );
    };
    let written = observe::history::read(&dir)
        .map_err(|e| format!("{}: {e}", dir.join(observe::history::FILE).display()))
        .and_then(|history| {
            let job = history
                .iter()
                .rfind(|r| r["type"] == "start")
                .and_then(|r| r["job"].as_str())
                .unwrap_or_default()
                .to_string();
            observe::report::write(&job, &newest, &history).map_err(|e| e.to_string())
        });
    match written {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn bad_input(message: impl std::fmt::Display, hint: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}\n  hint: {hint}");
    ExitCode::from(EXIT_BAD_INPUT)
}

/// The launcher, the job token and the bound listener: each refused with exit 2 and a hint
/// before any dataset is read or any worker started.
fn prepare_startup(c: &config::JobConfig) -> Result<driver::Startup, ExitCode> {
    use config::LauncherKind;
    let env = |name: &str| std::env::var(name).ok();
    let launcher: Box<dyn launcher::Launcher> = match c.cluster.launcher {
        LauncherKind::Local => Box::new(launcher::local::LocalLauncher::new()),
        LauncherKind::External => Box::new(launcher::external::ExternalLauncher),
        LauncherKind::Slurm => {
            use launcher::slurm::{Allocation, SlurmLauncher};
            match Allocation::from_env(&env)
                .and_then(|a| SlurmLauncher::new(a, c.cluster.world_size))
                .map(|l| l.with_gpu_per_task(c.cluster.devices.binds_gpus()))
            {
                Ok(l) => Box::new(l),
                Err(e) => return Err(bad_input(&e, e.hint())),
            }
        }
    };
    let worker_binary = if launcher.tracks_exits() {
        resolve_worker_binary(c).map_err(|e| {
            bad_input(
                e,
                "build the workspace, or point cluster.worker_binary at the worker",
            )
        })?
    } else {
        PathBuf::new()
    };
    let token = endpoint::job_token(c, &env).map_err(|e| bad_input(&e, e.hint()))?;
    let listener = endpoint::bind(c.cluster.listen).map_err(|e| bad_input(&e, e.hint()))?;
    let observe_listener =
        endpoint::bind_observer(c.observe.listen).map_err(|e| bad_input(&e, e.hint()))?;
    // Last of the refusals, first write: nothing under checkpoint.dir is touched before this.
    let lease = if c.cluster.resume == config::ResumeSetting::Auto {
        lease::Lease::acquire_or_wait(
            &c.checkpoint_dir,
            &c.name,
            c.checkpoint_lease_timeout,
            |held| {
                eprintln!(
                    "{held}\n  waiting for it to expire (resume: auto — a replaced coordinator's predecessor leaves its lease behind); refused if its owner renews it"
                )
            },
        )
    } else {
        lease::Lease::acquire(&c.checkpoint_dir, &c.name, c.checkpoint_lease_timeout)
    }
    .map_err(|e| bad_input(&e, e.hint()))?;
    Ok(driver::Startup {
        lease,
        listener,
        observe_listener,
        token,
        worker_binary,
        launcher,
        gpu_need: None,
    })
}

fn launch(config: config::JobConfig, startup: driver::Startup) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // The driver runs on this (main) thread: workers' parent-death signal is tied to the thread
    // that forked them, and this one lives as long as the job.
    let (source, checkpoints) = (config.source.clone(), config.checkpoint_dir.clone());
    // After a failure or an interrupt: how to go on from the newest committed checkpoint.
    let resume_hint = || {
        if let Some((step, _)) = checkpoint::committed(&checkpoints).pop() {
            eprintln!(
                "to continue from step {step}: coordinator launch {} --resume",
                source.display()
            );
        }
    };
    let report = runtime.block_on(driver::run(config, startup))?;
    Ok(match report.outcome {
        Outcome::Succeeded { final_checkpoint } => {
            if let (Some(before), Some(after)) = (report.eval_before, report.eval_after) {
                let change = if before > 0.0 {
                    (after - before) / before * 100.0
                } else {
                    0.0
                };
                println!("held-out loss: {before:.4} -> {after:.4} ({change:+.1}%)");
            }
            if let Some(path) = final_checkpoint {
                println!("final checkpoint: {path}");
            }
            ExitCode::SUCCESS
        }
        Outcome::Failed { reason } => {
            eprintln!("error: job failed: {reason}");
            if let Some((dir, file)) = &report.damaged {
                // Never resumed from again: the next --resume takes the checkpoint before it.
                let dir = Path::new(dir);
                match checkpoint::set_aside(dir) {
                    Ok(to) => eprintln!(
                        "warning: {file} does not match its checkpoint's manifest; {} is set aside as {}",
                        dir.display(),
                        to.display()
                    ),
                    Err(e) => eprintln!("warning: could not set {} aside: {e}", dir.display()),
                }
            }
            resume_hint();
            ExitCode::from(EXIT_FAILED)
        }
        Outcome::Refused { reason } => {
            eprintln!("error: {reason}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Outcome::Interrupted => {
            eprintln!("interrupted: all workers stopped");
            resume_hint();
            ExitCode::from(EXIT_INTERRUPTED)
        }
    })
}

fn check_deployment(manifests: &std::path::Path) -> ExitCode {
    let text = if manifests == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(manifests)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}: {e}", manifests.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match ferrotune_coordinator::deployment::check(&text) {
        Ok(d) => {
            println!(
                "ok: Job/{} starts {} workers for Job/{}; shared claim {} at {}",
                d.worker_job, d.world_size, d.coordinator_job, d.shared_claim, d.shared_path
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", manifests.display());
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}
