//! The tonic service: pb messages in, domain events to the driver, pb answers out.
//! No job logic lives here; the generated `pb` types stay inside this module.

use crate::config::{JobConfig, ModelInit};
use crate::job::devices::{Backend, WorkerDevices};
use crate::job::{
    Assignment, EvalMetrics, Event, HeartbeatAnswer, Sample, StepMetrics, TaskEval, Telemetry,
    WorkerInfo, WorkerPhase,
};
use ferrotune_data::manifest::FileDigest;
use ferrotune_proto::v1 as pb;
use ferrotune_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

/// The driver's answer to one inbound event.
#[derive(Debug)]
pub enum Reply {
    Assigned(Assignment),
    Rejected(String),
    Heartbeat(HeartbeatAnswer),
    Committed(Result<String, String>),
    /// A part of a checkpoint, accepted; it commits when every part is in.
    PartAccepted,
    Ack,
}

/// One event from a worker, with the channel its answer goes back on.
pub struct Inbound {
    pub event: Event,
    pub reply: oneshot::Sender<Reply>,
}

pub struct Service {
    inbound: mpsc::Sender<Inbound>,
    spec: pb::TrainingSpec,
}

/// The service wrapped in the token check. Every RPC without the job's token is refused.
pub fn build(
    inbound: mpsc::Sender<Inbound>,
    config: &JobConfig,
    token: String,
) -> tonic::service::interceptor::InterceptedService<
    CoordinatorServer<Service>,
    impl tonic::service::Interceptor + Clone,
> {
    let service = Service {
        inbound,
        spec: training_spec(config),
    };
    CoordinatorServer::with_interceptor(service, move |req: Request<()>| {
        let given = req
            .metadata()
            .get(ferrotune_proto::TOKEN_METADATA_KEY)
            .and_then(|v| v.to_str().ok());
        if given == Some(token.as_str()) {
            Ok(req)
        } else {
            let from = req
                .remote_addr()
                .map_or("an unknown address".to_string(), |a| a.to_string());
            tracing::warn!("refused a call from {from}: missing or wrong job token");
            Err(Status::unauthenticated(
                "missing or wrong job token: give the worker the job's token in FERROTUNE_JOB_TOKEN or --token-file",
            ))
        }
    })
}

fn training_spec(c: &JobConfig) -> pb::TrainingSpec {
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    pb::TrainingSpec {
        job_name: c.name.clone(),
        seed: c.seed,
        model: Some(pb::ModelSpec {
            path: path(&c.model_path),
            random_init: c.model_init == ModelInit::Random,
            activation_checkpointing: c.activation_checkpointing,
            precision: c.precision.clone(),
        }),
        data: Some(pb::DataSpec {
            train_path: String::new(),
            eval_path: String::new(),
            seq_len: c.data.seq_len,
            eval_max_sequences: c.data.eval_max_sequences,
            datasets: c
                .data
                .datasets
                .iter()
                .map(|d| pb::DatasetSpec {
                    name: d.name.clone(),
                    path: path(&d.path),
                    format: d.format.name().into(),
                    weight: d.weight,
                    eval_path: d.eval_path.as_deref().map(path).unwrap_or_default(),
                })
                .collect(),
            packing: c.data.packing,
            overlong: c.data.overlong.name().into(),
            train_on_inputs: c.data.train_on_inputs,
            chat_template: c.data.chat_template.clone().unwrap_or_default(),
            chat_template_kwargs: serde_json::Value::Object(c.data.chat_template_kwargs.clone())
                .to_string(),
            eval_samples: c.data.eval_samples,
            cache_dir: path(&c.data.cache_dir),
        }),
        optim: Some(pb::OptimSpec {
            lr: c.lr,
            min_lr: c.min_lr,
            warmup_steps: c.warmup_steps,
            total_steps: c.steps,
            weight_decay: c.weight_decay,
            beta1: c.betas.0,
            beta2: c.betas.1,
            eps: c.eps,
            grad_clip: c.grad_clip,
            micro_batch_size: c.micro_batch_size,
            grad_accum_steps: c.grad_accum_steps,
            zero_stage: c.zero_stage,
        }),
        checkpoint: Some(pb::CheckpointSpec {
            dir: path(&c.checkpoint_dir),
            every_steps: c.checkpoint_every_steps,
            dtype: c.checkpoint_dtype.clone().unwrap_or_default(),
            max_shard_bytes: c.checkpoint_max_shard_bytes,
            // Each generation's starting checkpoint travels in its assignment.
            resume_from: String::new(),
        }),
        // 0 lets each worker divide its own host's cores among the workers there.
        intra_op_threads: c.cluster.threads_per_worker.unwrap_or(0),
        collective_timeout_ms: c.cluster.collective_timeout.as_millis() as u64,
        heartbeat_interval_ms: c.cluster.heartbeat_interval.as_millis() as u64,
        heartbeat_timeout_ms: c.cluster.heartbeat_timeout.as_millis() as u64,
        bucket_bytes: c.cluster.bucket_bytes,
        log_every_steps: c.log_every_steps,
        // Resolved per group from the workers' reports; set in each answer.
        device: String::new(),
    }
}

impl Service {
    async fn send(&self, event: Event) -> Result<Reply, Status> {
        let (reply, answer) = oneshot::channel();
        self.inbound
            .send(Inbound { event, reply })
            .await
            .map_err(|_| Status::unavailable("the job is over"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the job is over"))
    }

    async fn ack(&self, event: Event) -> Result<Response<pb::Ack>, Status> {
        match self.send(event).await? {
            Reply::Rejected(reason) => Err(Status::failed_precondition(reason)),
            _ => Ok(Response::new(pb::Ack {})),
        }
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = request.into_inner();
        if r.worker_id.is_empty() || r.peer_address.is_empty() {
            return Err(Status::invalid_argument(
                "worker_id and peer_address are required",
            ));
        }
        let info = WorkerInfo {
            worker_id: r.worker_id,
            host: r.host,
            local_index: r.local_index,
            peer_address: r.peer_address,
            version: r.worker_version,
            devices: WorkerDevices {
                cuda_devices: r.devices.iter().filter(|d| d.kind == "cuda").count() as u32,
                cuda_unavailable: (!r.cuda_unavailable.is_empty()).then_some(r.cuda_unavailable),
                nccl_unavailable: (!r.nccl_unavailable.is_empty()).then_some(r.nccl_unavailable),
                nccl_id: (!r.nccl_unique_id.is_empty()).then_some(r.nccl_unique_id),
                gpu_memory: r
                    .devices
                    .iter()
                    .filter(|d| d.kind == "cuda" && d.memory_bytes > 0)
                    .map(|d| d.memory_bytes)
                    .min(),
            },
        };
        match self.send(Event::Registered(info)).await? {
            Reply::Assigned(a) => Ok(Response::new(pb::RegisterResponse {
                spec: Some(pb::TrainingSpec {
                    device: a.device.name().into(),
                    ..self.spec.clone()
                }),
                assignment: Some(pb::Assignment {
                    rank: a.rank,
                    world_size: a.world_size,
                    local_rank: a.local_rank,
                    local_world_size: a.local_world_size,
                    generation: a.generation,
                    peer_addresses: Vec::new(),
                    next_peer_address: a.next_peer_address,
                    backend: match a.backend {
                        Backend::Ring => pb::CollectiveBackend::TcpRing,
                        Backend::Nccl => pb::CollectiveBackend::Nccl,
                    } as i32,
                    resume_from: a.resume_from.unwrap_or_default(),
                    grad_accum_steps: a.grad_accum_steps,
                    nccl_unique_id: a.nccl_id.unwrap_or_default(),
                }),
            })),
            Reply::Rejected(reason) => Err(Status::failed_precondition(reason)),
            other => Err(Status::internal(format!(
                "unexpected answer to register: {other:?}"
            ))),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let phase = match pb::WorkerPhase::try_from(r.phase) {
            Ok(pb::WorkerPhase::Loading) => WorkerPhase::Loading,
            Ok(pb::WorkerPhase::Training) => WorkerPhase::Training,
            Ok(pb::WorkerPhase::Eval) => WorkerPhase::Eval,
            Ok(pb::WorkerPhase::Checkpoint) => WorkerPhase::Checkpoint,
            _ => WorkerPhase::Unknown,
        };
        let reply = self
            .send(Event::Heartbeat {
                rank: r.rank,
                generation: r.generation,
                phase,
                telemetry: Telemetry {
                    memory_baseline: r.memory_baseline_bytes,
                    memory_peak: r.memory_peak_bytes,
                    step_seconds: r.step_seconds,
                },
            })
            .await?;
        let (command, reason) = match reply {
            Reply::Heartbeat(HeartbeatAnswer::Continue) => (pb::Command::Continue, String::new()),
            Reply::Heartbeat(HeartbeatAnswer::Rejoin) => (
                pb::Command::Rejoin,
                "the group is re-formed after a failure".to_string(),
            ),
            Reply::Heartbeat(HeartbeatAnswer::Stop(reason)) => (pb::Command::Abort, reason),
            _ => (pb::Command::Abort, "the job is over".to_string()),
        };
        Ok(Response::new(pb::HeartbeatResponse {
            command: command as i32,
            reason,
        }))
    }

    async fn report_step(
        &self,
        request: Request<pb::StepReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let metrics = StepMetrics {
            step: r.step,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens: r.tokens,
            input_tokens: r.input_tokens,
            step_seconds: r.step_seconds,
        };
        self.ack(Event::StepReported {
            rank: r.rank,
            generation: r.generation,
            metrics,
        })
        .await
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let metrics = EvalMetrics {
            step: r.step,
            phase: r.phase,
            loss: r.loss,
            tokens: r.tokens,
            tasks: r
                .tasks
                .into_iter()
                .map(|t| TaskEval {
                    name: t.name,
                    loss: t.loss,
                    tokens: t.tokens,
                })
                .collect(),
        };
        self.ack(Event::EvalReported {
            rank: r.rank,
            generation: r.generation,
            metrics,
        })
        .await
    }

    async fn report_samples(
        &self,
        request: Request<pb::SampleReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        let samples = r
            .samples
            .into_iter()
            .map(|s| Sample {
                dataset: s.dataset,
                index: s.index,
                prompt: s.prompt,
                answer: s.answer,
                reference: s.reference,
            })
            .collect();
        self.ack(Event::SamplesReported {
            rank: r.rank,
            generation: r.generation,
            phase: r.phase,
            samples,
        })
        .await
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CheckpointReady>,
    ) -> Result<Response<pb::CheckpointCommitted>, Status> {
        let r = request.into_inner();
        let event = Event::CheckpointReady {
            rank: r.rank,
            generation: r.generation,
            step: r.step,
            staging_dir: r.staging_dir,
            is_final: r.is_final,
            parts: r.parts,
            timing: (r.stall_seconds, r.write_seconds),
            files: r
                .files
                .into_iter()
                .map(|f| FileDigest {
                    path: f.path,
                    bytes: f.bytes,
                    sha256: f.sha256,
                })
                .collect(),
        };
        match self.send(event).await? {
            Reply::Committed(Ok(path)) => Ok(Response::new(pb::CheckpointCommitted {
                path,
                pending: false,
            })),
            Reply::PartAccepted => Ok(Response::new(pb::CheckpointCommitted {
                path: String::new(),
                pending: true,
            })),
            Reply::Committed(Err(e)) => Err(Status::internal(e)),
            Reply::Rejected(reason) => Err(Status::failed_precondition(reason)),
            // Never a success without a path: the worker would report a checkpoint that is not.
            other => Err(Status::internal(format!(
                "checkpoint of step {} not committed: unexpected answer {other:?}",
                r.step
            ))),
        }
    }

    async fn finish(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = request.into_inner();
        self.ack(Event::Finished {
            rank: r.rank,
            generation: r.generation,
            ok: r.ok,
            error: r.error,
            retriable: r.retriable,
            damaged_file: (!r.damaged_file.is_empty()).then_some(r.damaged_file),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_proto::v1::coordinator_client::CoordinatorClient;

    /// A real server in front of a stand-in driver that answers every event with `answer()`.
    /// Returns its address, the driver (counting what got through) and the server's stop.
    async fn serve(
        answer: fn() -> Reply,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<usize>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let text = crate::config::tests::fixture(tmp.path());
        let config = crate::config::parse(&text, tmp.path()).unwrap();
        let (tx, mut rx) = mpsc::channel::<Inbound>(8);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(build(tx, &config, "secret".into()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        let driver = tokio::spawn(async move {
            let mut seen = 0;
            while let Some(inbound) = rx.recv().await {
                seen += 1;
                let _ = inbound.reply.send(answer());
            }
            seen
        });
        (addr, driver, stop, server)
    }

    fn with_token<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            ferrotune_proto::TOKEN_METADATA_KEY,
            "secret".parse().unwrap(),
        );
        request
    }

    #[tokio::test]
    async fn calls_without_the_job_token_are_refused() {
        let (addr, driver, stop, server) =
            serve(|| Reply::Heartbeat(HeartbeatAnswer::Continue)).await;
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let beat = || pb::HeartbeatRequest {
            rank: 0,
            generation: 1,
            step: 0,
            phase: pb::WorkerPhase::Training as i32,
            ..Default::default()
        };

        let err = client.heartbeat(beat()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(beat());
        wrong.metadata_mut().insert(
            ferrotune_proto::TOKEN_METADATA_KEY,
            "guess".parse().unwrap(),
        );
        assert_eq!(
            client.heartbeat(wrong).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );

        let answer = client
            .heartbeat(with_token(beat()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.command, pb::Command::Continue as i32);

        drop(client);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        assert_eq!(
            driver.await.unwrap(),
            1,
            "only the call with the token may reach the job"
        );
    }

    #[tokio::test]
    async fn a_commit_answered_with_anything_but_a_path_is_an_error() {
        // The job already over answers a late commit with a plain acknowledgement.
        let (addr, _driver, stop, server) = serve(|| Reply::Ack).await;
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let ready = pb::CheckpointReady {
            rank: 0,
            generation: 1,
            step: 7,
            staging_dir: "/tmp/nowhere".into(),
            is_final: false,
            files: Vec::new(),
            stall_seconds: 0.0,
            write_seconds: 0.0,
            parts: 1,
        };
        let err = client
            .commit_checkpoint(with_token(ready))
            .await
            .expect_err("an acknowledgement is not a commit");
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(
            err.message().contains("step 7 not committed"),
            "{}",
            err.message()
        );
        drop(client);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
