//! The worker's side of the gRPC API: register, heartbeats, reports. The generated `pb` types
//! stay in this module; the training loop sees [`Reporter`](crate::train::Reporter) and domain
//! types only.

mod heartbeat;
mod reporter;
pub use heartbeat::{heartbeat_loop, HeartbeatTiming, Membership, Signal};
pub use reporter::GrpcReporter;

use crate::model::DType;
use crate::precision::Precision;
use crate::spec::{Backend, DatasetSpec, Placement, TrainSpec};
use crate::train::TrainPhase;
use ferrotune_data::pack::Overlong;
use ferrotune_data::record::Format;
use ferrotune_proto::v1 as pb;
use ferrotune_proto::v1::coordinator_client::CoordinatorClient;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the coordinator at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the coordinator refused: {} ({:?})", .0.message(), .0.code())]
    Rpc(#[from] Status),
    #[error("the coordinator sent an incomplete answer: {0}")]
    Protocol(&'static str),
    #[error("the job token is not valid metadata")]
    BadToken,
}

const WAITING_NOTICE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone)]
struct TokenInterceptor(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(ferrotune_proto::TOKEN_METADATA_KEY, self.0.clone());
        Ok(req)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// How a generation ended for this worker, as the coordinator is told.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// None: success.
    pub error: Option<String>,
    pub damaged_file: Option<String>,
    /// The error may pass in a new generation: the worker waits to rejoin.
    pub retriable: bool,
}

#[derive(Clone)]
pub struct Agent {
    client: Client,
}

/// What this worker tells the coordinator about itself.
pub struct Identity {
    pub worker_id: String,
    pub host: String,
    pub local_index: u32,
    pub peer_address: String,
}

impl Agent {
    /// Connects, retrying for up to `patience` (the coordinator may still be starting).
    pub async fn connect(url: &str, token: &str, patience: Duration) -> Result<Self, AgentError> {
        let token = MetadataValue::try_from(token).map_err(|_| AgentError::BadToken)?;
        let endpoint = Channel::from_shared(url.to_string())
            .map_err(|e| AgentError::Connect {
                url: url.into(),
                message: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            // A registration waits for the whole group, with no heartbeat meanwhile: HTTP/2
            // pings find a coordinator host that vanished without closing the connection.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let started = Instant::now();
        let mut told = Duration::ZERO;
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if started.elapsed() >= patience => {
                    return Err(AgentError::Connect {
                        url: url.into(),
                        message: e.to_string(),
                    })
                }
                Err(e) => {
                    // Workers started beside the coordinator (a Kubernetes Job, a script per
                    // host) may wait while it validates the data: say so now and then.
                    if started.elapsed() >= told + WAITING_NOTICE {
                        told = started.elapsed();
                        tracing::warn!(
                            "still waiting for the coordinator at {url} after {:.0?}: {e}",
                            told
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        };
        Ok(Agent {
            client: CoordinatorClient::with_interceptor(channel, TokenInterceptor(token)),
        })
    }

    #[tracing::instrument(skip(self, me), fields(worker_id = %me.worker_id))]
    pub async fn register(&self, me: &Identity) -> Result<(Placement, TrainSpec), AgentError> {
        let inventory = crate::device::inventory();
        let mut devices = vec![pb::Device {
            kind: "cpu".into(),
            index: 0,
            name: "cpu".into(),
            memory_bytes: 0,
        }];
        devices.extend(inventory.cuda.iter().map(|d| pb::Device {
            kind: "cuda".into(),
            index: d.index as u32,
            name: d.name.clone(),
            memory_bytes: d.memory_bytes,
        }));
        // Offered in case this worker becomes rank 0 (ranks are known only once the group is).
        let mut nccl_unavailable = inventory.nccl_unavailable.clone();
        let nccl_unique_id = match &nccl_unavailable {
            Some(_) => Vec::new(),
            None => crate::collective::nccl::unique_id().unwrap_or_else(|e| {
                nccl_unavailable = Some(e.to_string());
                Vec::new()
            }),
        };
        let request = pb::RegisterRequest {
            worker_id: me.worker_id.clone(),
            host: me.host.clone(),
            local_index: me.local_index,
            devices,
            peer_address: me.peer_address.clone(),
            pid: std::process::id(),
            worker_version: ferrotune_proto::VERSION.into(),
            cuda_unavailable: inventory.cuda_unavailable.unwrap_or_default(),
            nccl_unavailable: nccl_unavailable.unwrap_or_default(),
            nccl_unique_id,
        };
        let answer = self.client.clone().register(request).await?.into_inner();
        let a = answer
            .assignment
            .ok_or(AgentError::Protocol("register: no assignment"))?;
        let s = answer
            .spec
            .ok_or(AgentError::Protocol("register: no training spec"))?;
        let placement = Placement {
            rank: a.rank as usize,
            world_size: a.world_size as usize,
            local_rank: a.local_rank as usize,
            local_world_size: a.local_world_size as usize,
            generation: a.generation,
            next_peer_address: a.next_peer_address,
            resume_from: (!a.resume_from.is_empty()).then(|| PathBuf::from(a.resume_from)),
            grad_accum_steps: (a.grad_accum_steps > 0).then_some(a.grad_accum_steps as usize),
            backend: match pb::CollectiveBackend::try_from(a.backend) {
                Ok(pb::CollectiveBackend::Nccl) => Backend::Nccl {
                    unique_id: a.nccl_unique_id,
                },
                _ => Backend::Ring,
            },
            device: tch::Device::Cpu,
        };
        Ok((placement, spec_from_pb(s)?))
    }

    /// One heartbeat; Some(signal) when the coordinator says to leave the generation.
    pub async fn heartbeat(
        &self,
        rank: usize,
        generation: u64,
        progress: heartbeat::Progress,
    ) -> Result<Option<Signal>, AgentError> {
        let phase = match progress.phase {
            TrainPhase::Loading => pb::WorkerPhase::Loading,
            TrainPhase::Training => pb::WorkerPhase::Training,
            TrainPhase::Eval => pb::WorkerPhase::Eval,
            TrainPhase::Checkpoint => pb::WorkerPhase::Checkpoint,
        };
        let r = self
            .client
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                rank: rank as u32,
                generation,
                step: progress.step,
                phase: phase as i32,
                memory_baseline_bytes: progress.memory_baseline,
                memory_peak_bytes: progress.memory_peak,
                step_seconds: progress.step_seconds,
            })
            .await?
            .into_inner();
        Ok(match pb::Command::try_from(r.command) {
            Ok(pb::Command::Rejoin) => Some(Signal::Rejoin),
            Ok(pb::Command::Abort) => Some(Signal::Stop(r.reason)),
            _ => None,
        })
    }

    /// Reports the outcome; gives up after `limit` (the coordinator may be gone).
    pub async fn finish(
        &self,
        placement: &Placement,
        outcome: &Outcome,
        limit: Duration,
    ) -> Result<(), AgentError> {
        let request = pb::FinishRequest {
            rank: placement.rank as u32,
            generation: placement.generation,
            ok: outcome.error.is_none(),
            error: outcome.error.clone().unwrap_or_default(),
            damaged_file: outcome.damaged_file.clone().unwrap_or_default(),
            retriable: outcome.retriable,
        };
        match tokio::time::timeout(limit, self.client.clone().finish(request)).await {
            Ok(answer) => answer.map(drop).map_err(AgentError::from),
            Err(_) => Err(AgentError::Rpc(Status::deadline_exceeded(format!(
                "no answer within {limit:?}"
            )))),
        }
    }
}

fn spec_from_pb(s: pb::TrainingSpec) -> Result<TrainSpec, AgentError> {
    let model = s.model.ok_or(AgentError::Protocol("spec: no model"))?;
    let data = s.data.ok_or(AgentError::Protocol("spec: no data"))?;
    let optim = s.optim.ok_or(AgentError::Protocol("spec: no optimizer"))?;
    let checkpoint = s
        .checkpoint
        .ok_or(AgentError::Protocol("spec: no checkpoint"))?;
    Ok(TrainSpec {
        job_name: s.job_name,
        seed: s.seed,
        model_path: PathBuf::from(model.path),
        random_init: model.random_init,
        datasets: data
            .datasets
            .into_iter()
            .map(|d| {
                Ok(DatasetSpec {
                    format: Format::from_name(&d.format)
                        .ok_or(AgentError::Protocol("spec: unknown dataset format"))?,
                    name: d.name,
                    path: PathBuf::from(d.path),
                    weight: d.weight,
                    eval_path: (!d.eval_path.is_empty()).then(|| PathBuf::from(d.eval_path)),
                })
            })
            .collect::<Result<_, AgentError>>()?,
        seq_len: data.seq_len as usize,
        eval_max_sequences: data.eval_max_sequences as usize,
        eval_samples: data.eval_samples as usize,
        packing: data.packing,
        overlong: Overlong::from_name(&data.overlong)
            .ok_or(AgentError::Protocol("spec: unknown overlong policy"))?,
        train_on_inputs: data.train_on_inputs,
        chat_template: (!data.chat_template.is_empty()).then_some(data.chat_template),
        chat_template_kwargs: match data.chat_template_kwargs.as_str() {
            "" => serde_json::Map::new(),
            text => serde_json::from_str(text).map_err(|_| {
                AgentError::Protocol("spec: chat_template_kwargs is no JSON object")
            })?,
        },
        cache_dir: PathBuf::from(data.cache_dir),
        lr: optim.lr,
        min_lr: optim.min_lr,
        warmup_steps: optim.warmup_steps,
        total_steps: optim.total_steps,
        weight_decay: optim.weight_decay,
        beta1: optim.beta1,
        beta2: optim.beta2,
        eps: optim.eps,
        grad_clip: optim.grad_clip,
        micro_batch_size: optim.micro_batch_size as usize,
        grad_accum_steps: optim.grad_accum_steps as usize,
        zero_stage: crate::zero::Stage::from_number(optim.zero_stage)
            .ok_or(AgentError::Protocol("spec: unknown zero_stage"))?,
        checkpoint_dir: PathBuf::from(checkpoint.dir),
        checkpoint_every_steps: checkpoint.every_steps,
        checkpoint_dtype: match checkpoint.dtype.as_str() {
            "" => None,
            name => Some(
                DType::from_hf_name(name)
                    .ok_or(AgentError::Protocol("spec: unknown checkpoint dtype"))?,
            ),
        },
        checkpoint_max_shard_bytes: checkpoint.max_shard_bytes.max(1),
        activation_checkpointing: model.activation_checkpointing,
        precision: Precision::from_name(&model.precision)
            .ok_or(AgentError::Protocol("spec: unknown precision"))?,
        intra_op_threads: s.intra_op_threads as usize,
        collective_timeout: Duration::from_millis(s.collective_timeout_ms.max(1)),
        heartbeat_interval: Duration::from_millis(s.heartbeat_interval_ms.max(10)),
        heartbeat_timeout: match s.heartbeat_timeout_ms {
            // From a coordinator that does not send it: what workers used before.
            0 => Duration::from_millis(s.heartbeat_interval_ms.max(10) * 10)
                .max(Duration::from_secs(15)),
            ms => Duration::from_millis(ms),
        },
        bucket_bytes: s.bucket_bytes as usize,
        log_every_steps: s.log_every_steps.max(1) as u64,
        device_kind: s.device.clone(),
    })
}
