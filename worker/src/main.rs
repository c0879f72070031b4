//! `worker run --coordinator URL ...`: one rank of a ferrotune job. Normally started by a
//! launcher, which passes the job token in FERROTUNE_JOB_TOKEN.
//! `worker generate` / `worker score`: inference on a model directory, for evaluation.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrotune_worker::commands;
use ferrotune_worker::identity;
use ferrotune_worker::infer::Sampling;
use ferrotune_worker::run::{self, RunArgs};
use std::path::PathBuf;
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
    /// Join a job and train. The job token comes from FERROTUNE_JOB_TOKEN or --token-file,
    /// never from the command line (it would show in `ps`).
    Run {
        /// Coordinator gRPC endpoint, e.g. http://10.0.0.5:50051.
        #[arg(long)]
        coordinator: String,
        /// File holding the job token (wins over FERROTUNE_JOB_TOKEN).
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// Identity stable across restarts of the same slot [default: $SLURM_JOB_ID.$SLURM_PROCID
        /// under Slurm, the pod's host name under an Indexed Job, else HOST:LOCAL_INDEX].
        #[arg(long)]
        worker_id: Option<String>,
        /// Host name ranks are ordered by [default: $SLURMD_NODENAME, else the kernel's].
        #[arg(long)]
        host: Option<String>,
        /// Index among the workers of this host [default: $SLURM_LOCALID, $LOCAL_RANK, else 0].
        #[arg(long)]
        local_index: Option<u32>,
        /// Address the gradient collective listens on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
        /// Address peers dial to reach this worker [default: --bind if concrete, else this
        /// host's address on the route to the coordinator].
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Continue a prompt with a model directory (a base model or a checkpoint).
    Generate {
        /// Hugging Face model directory: config.json, safetensors weights, tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Treat the prompt as a user message: render it with the model's chat template and
        /// its generation prompt (tokenizer_config.json's `chat_template`).
        #[arg(long)]
        chat: bool,
        /// With --chat: a Jinja template file to use instead of the model's own (to compare a
        /// base model that has none with its fine-tuned checkpoint).
        #[arg(long, requires = "chat")]
        chat_template: Option<PathBuf>,
        /// With --chat: template variables as a JSON object (`{"enable_thinking": false}`), as
        /// `apply_chat_template(**kwargs)` takes them. Default: those the checkpoint was trained
        /// with (its trainer_state.json), else none.
        #[arg(long, requires = "chat")]
        chat_template_kwargs: Option<String>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 for greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Mean next-token loss of each {"text": ...} line of a JSONL file, as JSON lines.
    Score {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        Command::Generate {
            model,
            prompt,
            chat,
            chat_template,
            chat_template_kwargs,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            device,
        } => report((|| {
            let top_p_ok = top_p > 0.0 && top_p <= 1.0;
            if !top_p_ok || temperature.is_nan() || temperature < 0.0 {
                anyhow::bail!("--top-p must be in (0, 1] and --temperature at least 0");
            }
            let sampling = Sampling {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop: Vec::new(),
            };
            let chat = match (chat, chat_template) {
                (false, _) => commands::Chat::Off,
                (true, None) => commands::Chat::ModelTemplate,
                (true, Some(path)) => commands::Chat::Template(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("--chat-template {}", path.display()))?,
                ),
            };
            let kwargs = chat_template_kwargs
                .map(|text| {
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                        .with_context(|| {
                            format!("--chat-template-kwargs `{text}`: expected a JSON object")
                        })
                })
                .transpose()?;
            let device = commands::device(&device)?;
            commands::generate(&model, &prompt, (chat, kwargs), device, sampling)
        })()),
        Command::Score {
            model,
            input,
            device,
        } => report(commands::device(&device).and_then(|d| commands::score(&model, &input, d))),
        Command::Run {
            coordinator,
            token_file,
            worker_id,
            host,
            local_index,
            bind,
            advertise,
        } => {
            let flags = identity::Flags {
                token_file,
                worker_id,
                host,
                local_index,
            };
            let env = |name: &str| std::env::var(name).ok();
            let resolved =
                identity::resolve(&flags, &env, &identity::kernel_hostname()).and_then(|id| {
                    let peer =
                        identity::advertised_address(bind, advertise.as_deref(), &coordinator)?;
                    Ok((id, peer))
                });
            let (id, advertise) = match resolved {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(run::EXIT_REFUSED);
                }
            };
            let args = RunArgs {
                coordinator,
                token: id.token,
                worker_id: id.worker_id,
                host: id.host,
                local_index: id.local_index,
                bind,
                advertise,
            };
            match run::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
