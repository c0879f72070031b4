//! `launcher: external` on one host: workers started by hand join a coordinator that starts
//! nothing. A caller of another ferrotune version is refused in one line and takes no place in
//! the group; the right workers then complete the job, decided by their Finish reports alone.

mod common;
use common::*;
use ferrotune_proto::v1 as pb;
use std::process::Command;
use std::time::Duration;

/// Registers as `worker_id` like a worker of `version` would; returns the refusal.
fn register_as(url: &str, token: &str, worker_id: &str, version: &str) -> tonic::Status {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = pb::coordinator_client::CoordinatorClient::connect(url.to_string())
            .await
            .unwrap();
        let mut request = tonic::Request::new(pb::RegisterRequest {
            worker_id: worker_id.into(),
            host: "a-host".into(),
            local_index: 0,
            devices: vec![],
            peer_address: "127.0.0.1:9".into(),
            pid: 1,
            worker_version: version.into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert(ferrotune_proto::TOKEN_METADATA_KEY, token.parse().unwrap());
        let answer = tokio::time::timeout(Duration::from_secs(10), client.register(request))
            .await
            .expect("a refusal comes at once, not after the rendezvous");
        answer.expect_err("a worker of another version must be refused")
    })
}

/// grpc.health.v1 Check for `service`, without the job token (as Kubernetes' probe asks).
fn health(url: &str, service: &str) -> Result<i32, tonic::Code> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let request = HealthCheckRequest {
            service: service.into(),
        };
        client
            .check(request)
            .await
            .map(|r| r.into_inner().status)
            .map_err(|s| s.code())
    })
}

#[test]
fn workers_started_elsewhere_join_and_a_mismatched_version_is_refused() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let port = free_port();
    let job = random_model_job(2, 2, 0, 6, 1.0e-3, "out").replace(
        "  launcher: local\n",
        &format!("  launcher: external\n  listen: 127.0.0.1:{port}\n"),
    );
    let path = tmp.path().join("external.yaml");
    std::fs::write(&path, job).unwrap();
    let token = "rendezvous-test-token";
    let tag = unique_tag();
    let mut cmd = Command::new(bin("coordinator"));
    cmd.arg("launch")
        .arg(&path)
        .env("FERROTUNE_JOB_TOKEN", token);
    let mut run = Launch::spawn_tagged(cmd, &tag);
    let url = format!("http://127.0.0.1:{port}");
    let dial = run.wait_for_line(Duration::from_secs(60), |l| l.starts_with("workers dial: "));
    assert_eq!(dial, format!("workers dial: {url}"));
    // Ready for workers: the readiness probe's answer, with no token.
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(health(&url, "ferrotune.v1.Coordinator"), Ok(serving));
    assert_eq!(health(&url, ""), Ok(serving));
    assert_eq!(health(&url, "no.such.Service"), Err(tonic::Code::NotFound));

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim().to_string();
    let start = |index: &str| {
        let mut cmd = Command::new(bin("worker"));
        cmd.args(["run", "--coordinator", &url, "--bind", "127.0.0.1"])
            .args(["--local-index", index])
            .env("FERROTUNE_JOB_TOKEN", token);
        Launch::spawn_tagged(cmd, &tag)
    };
    let first = start("0");
    run.wait_for_line(Duration::from_secs(30), |l| {
        l == format!("registered: worker {host}:0 on host {host} (1/2)")
    });

    // Under the id of the worker already waiting: refused, and the waiting one keeps its place.
    let refusal = register_as(&url, token, &format!("{host}:0"), "0.0.0-other");
    assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        refusal.message(),
        format!(
            "worker version 0.0.0-other does not match coordinator version {}: run the same ferrotune release on every host",
            ferrotune_proto::VERSION
        )
    );

    let mut workers = [first, start("1")];
    let status = run.wait(Duration::from_secs(120));
    let (out, err) = (run.stdout_text(), run.stderr_text());
    assert!(status.success(), "{out}\n{err}");
    let refused: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("registration refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{err}");
    assert!(refused[0].contains(&format!("worker_id={host}:0")), "{err}");
    assert!(
        refused[0].contains("does not match coordinator version"),
        "{err}"
    );
    // The default identity is host:local_index, and the local index orders ranks on one host.
    assert!(
        out.contains(&format!(
            "rank 0: worker {host}:0 on host {host} (collective 127.0.0.1:"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("rank 1: worker {host}:1 on host {host}")),
        "{out}"
    );
    assert!(tmp.path().join("out/step-00000006/manifest.json").is_file());
    for w in &mut workers {
        assert!(
            w.wait(Duration::from_secs(20)).success(),
            "{}",
            w.stderr_text()
        );
    }
    assert!(wait_no_tagged(&tag, Duration::from_secs(5)).is_empty());
}
