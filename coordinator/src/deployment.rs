//! `coordinator check-deployment`: the mistakes a Kubernetes deployment of a ferrotune job can
//! hold that neither kubectl nor a schema sees, read from rendered manifests
//! (`kubectl kustomize deploy/kubernetes/overlays/gpu | coordinator check-deployment -`).
//!
//! The coordinator pod is the container whose command is `coordinator launch CONFIG`, the workers
//! the Job whose container runs `worker run`; names do not matter. Each problem names the
//! object and field, what the other side says, and what to change.

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("the manifests are not YAML: {0}")]
    Yaml(String),
    #[error("{}", .0.join("\n"))]
    Problems(Vec<String>),
}

/// What a consistent deployment runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub world_size: u64,
    pub coordinator_job: String,
    pub worker_job: String,
    pub shared_claim: String,
    pub shared_path: String,
}

/// A pod template with where it came from.
struct Pod<'a> {
    job: &'a Value,
    spec: &'a Value,
    container: &'a Value,
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("?")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The command line of a container: command then args (`--flag=value` kept whole).
fn argv(container: &Value) -> Vec<&str> {
    let mut v = strings(&container["command"]);
    v.extend(strings(&container["args"]));
    v
}

fn find_pod<'a>(docs: &'a [Value], matches: impl Fn(&[&str]) -> bool) -> Option<Pod<'a>> {
    docs.iter().filter(|d| d["kind"] == "Job").find_map(|job| {
        let spec = &job["spec"]["template"]["spec"];
        spec["containers"]
            .as_array()?
            .iter()
            .find(|c| matches(&argv(c)))
            .map(|container| Pod {
                job,
                spec,
                container,
            })
    })
}

fn object<'a>(docs: &'a [Value], kind: &str, wanted: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && name(d) == wanted)
}

/// The volume mounted at the longest mount path that contains `path`, with that mount path.
fn volume_at<'a>(pod: &Pod<'a>, path: &str) -> Option<(&'a Value, &'a str)> {
    let mount = pod.container["volumeMounts"]
        .as_array()?
        .iter()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .filter(|(_, at)| {
            let at = at.trim_end_matches('/');
            path == at || path.starts_with(&format!("{at}/"))
        })
        .max_by_key(|(_, at)| at.len())?;
    let volume = pod.spec["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount.0)?;
    Some((volume, mount.1))
}

fn env_value<'a>(container: &'a Value, var: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == var)?["value"]
        .as_str()
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Checks rendered manifests (one or more YAML documents).
pub fn check(text: &str) -> Result<Deployment, DeploymentError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(text)
        .map_err(|e| DeploymentError::Yaml(e.to_string()))?
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    let mut problems = Vec::new();
    let coordinator = find_pod(&docs, |a| {
        a.len() >= 3 && a[0].ends_with("coordinator") && a[1] == "launch"
    });
    let workers = find_pod(&docs, |a| {
        a.len() >= 2 && a[0].ends_with("worker") && a[1] == "run"
    });
    let (Some(coordinator), Some(workers)) = (coordinator, workers) else {
        return Err(DeploymentError::Problems(vec![
            "no Job runs `coordinator launch CONFIG` and a Job `worker run`: check the manifests are ferrotune's (deploy/kubernetes)".into(),
        ]));
    };
    let cjob = name(coordinator.job).to_string();
    let wjob = name(workers.job).to_string();

    // The world size: parallelism, completions, and what the coordinator will wait for.
    let parallelism = number(&workers.job["spec"]["parallelism"]).unwrap_or(1);
    let completions = number(&workers.job["spec"]["completions"]);
    if workers.job["spec"]["completionMode"] != "Indexed" {
        problems.push(format!("Job/{wjob}: spec.completionMode must be Indexed (each worker pod keeps its index, and with it its worker id, when replaced)"));
    }
    if completions != Some(parallelism) {
        problems.push(format!(
            "Job/{wjob}: spec.completions is {} but spec.parallelism is {parallelism}: every worker must run at once; set the world size only in parallelism (the kustomization's replacements copy it)",
            completions.map_or("unset".into(), |c| c.to_string())
        ));
    }

    // cluster.yaml, from the ConfigMap mounted where `launch` reads it.
    let config_path = argv(coordinator.container)[2].to_string();
    let cluster = match volume_at(&coordinator, &config_path) {
        Some((volume, at)) if volume["configMap"].is_object() => {
            let map = volume["configMap"]["name"].as_str().unwrap_or("?");
            let file = config_path[at.trim_end_matches('/').len()..].trim_start_matches('/');
            match object(&docs, "ConfigMap", map).map(|m| &m["data"][file]) {
                Some(Value::String(text)) => match serde_saphyr::from_str::<Value>(text) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.push(format!("ConfigMap/{map} key {file}: not YAML: {e}"));
                        None
                    }
                },
                _ => {
                    problems.push(format!("Job/{cjob}: `coordinator launch {config_path}` reads ConfigMap/{map} key {file}, which these manifests do not hold: add it (configMapGenerator) or fix the path"));
                    None
                }
            }
        }
        _ => {
            problems.push(format!("Job/{cjob}: `coordinator launch {config_path}`: no ConfigMap volume is mounted there"));
            None
        }
    };
    let cluster_section = cluster.as_ref().map(|c| &c["cluster"]);
    if let Some(c) = cluster_section {
        if c["launcher"] != "external" {
            problems.push(format!("cluster.yaml: cluster.launcher is {} but the worker Job starts the workers: set `launcher: external`", c["launcher"]));
        }
        let env = env_value(coordinator.container, "FERROTUNE_WORLD_SIZE")
            .and_then(|v| v.parse::<u64>().ok());
        match (&c["world_size"], env) {
            (Value::String(s), Some(n)) if s == "auto" && n != parallelism => problems.push(format!(
                "Job/{cjob}: FERROTUNE_WORLD_SIZE is {n} but Job/{wjob} starts {parallelism} workers: keep the kustomization's replacements after the patch that sets parallelism"
            )),
            (Value::String(s), None) if s == "auto" => problems.push(format!(
                "Job/{cjob}: cluster.yaml says `world_size: auto` but the coordinator container has no FERROTUNE_WORLD_SIZE: keep the kustomization's replacements (they copy Job/{wjob}'s parallelism into it)"
            )),
            (v, _) => {
                if let Some(n) = number(v).filter(|&n| n != parallelism) {
                    problems.push(format!("cluster.yaml: cluster.world_size is {n} but Job/{wjob} has parallelism {parallelism}: set `world_size: auto` so the coordinator follows the Job"));
                }
            }
        }
    }

    // The coordinator's gRPC port: listen, the readiness probe, the Service, the workers' URL.
    let listen_port = cluster_section
        .and_then(|c| c["listen"].as_str())
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse::<u64>().ok());
    let probe = &coordinator.container["readinessProbe"]["grpc"];
    if probe.is_null() {
        problems.push(format!("Job/{cjob}: no gRPC readinessProbe (grpc.port = cluster.listen's port, service ferrotune.v1.Coordinator)"));
    } else if let (Some(l), Some(p)) = (listen_port, number(&probe["port"])) {
        if l != p {
            problems.push(format!(
                "Job/{cjob}: the readinessProbe asks port {p} but cluster.listen's port is {l}"
            ));
        }
    }
    let url = argv(workers.container)
        .iter()
        .find_map(|a| a.strip_prefix("--coordinator="))
        .map(str::to_string);
    match url
        .as_deref()
        .and_then(|u| u.split_once("://"))
        .map(|(_, rest)| rest)
    {
        Some(authority) => {
            let (host, port) = authority.split_once(':').unwrap_or((authority, "80"));
            let service = host.split('.').next().unwrap_or(host);
            match object(&docs, "Service", service) {
                None => problems.push(format!("Job/{wjob}: --coordinator names Service {service}, which these manifests do not hold")),
                Some(svc) => {
                    let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
                    let port: Option<u64> = port.trim_end_matches('/').parse().ok();
                    match ports.iter().find(|p| number(&p["port"]) == port) {
                        None => problems.push(format!("Service/{service} has no port {} (the workers' --coordinator)", port.map_or("?".into(), |p| p.to_string()))),
                        Some(p) => {
                            let target = number(&p["targetPort"]).or_else(|| {
                                let named = p["targetPort"].as_str()?;
                                coordinator.container["ports"].as_array()?.iter().find(|cp| cp["name"] == named).and_then(|cp| number(&cp["containerPort"]))
                            }).or(port);
                            if let (Some(t), Some(l)) = (target, listen_port) {
                                if t != l {
                                    problems.push(format!("Service/{service} sends port {} to {t}, but the coordinator listens on {l}", port.unwrap_or(0)));
                                }
                            }
                        }
                    }
                }
            }
        }
        None => problems.push(format!(
            "Job/{wjob}: the worker needs --coordinator=http://SERVICE:PORT"
        )),
    }

    // The token: the Secret both sides read must exist.
    for (pod, what) in [(&coordinator, &cjob), (&workers, &wjob)] {
        for v in pod.spec["volumes"].as_array().into_iter().flatten() {
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                if object(&docs, "Secret", secret).is_none() {
                    problems.push(format!("Job/{what}: volume {} needs Secret/{secret}, which these manifests do not hold: make the token (README \"Run on Kubernetes\") and keep the secretGenerator", v["name"].as_str().unwrap_or("?")));
                }
            }
        }
    }

    // Shared storage: one ReadWriteMany claim at the same path in every pod, holding the paths.
    let claim_of = |pod: &Pod| -> Option<(String, String)> {
        pod.container["volumeMounts"]
            .as_array()?
            .iter()
            .find_map(|m| {
                let v = pod.spec["volumes"]
                    .as_array()?
                    .iter()
                    .find(|v| v["name"] == m["name"])?;
                Some((
                    v["persistentVolumeClaim"]["claimName"]
                        .as_str()?
                        .to_string(),
                    m["mountPath"].as_str()?.trim_end_matches('/').to_string(),
                ))
            })
    };
    let shared = match (claim_of(&coordinator), claim_of(&workers)) {
        (Some(c), Some(w)) if c == w => Some(c),
        (Some(c), Some(w)) => {
            problems.push(format!("the coordinator mounts claim {} at {} but the workers claim {} at {}: checkpoints, data and model must be at the same path on the same volume", c.0, c.1, w.0, w.1));
            None
        }
        _ => {
            problems.push(format!(
                "Job/{cjob} and Job/{wjob} must both mount the shared PersistentVolumeClaim"
            ));
            None
        }
    };
    if let Some((claim, at)) = &shared {
        match object(&docs, "PersistentVolumeClaim", claim) {
            Some(pvc) if strings(&pvc["spec"]["accessModes"]).contains(&"ReadWriteMany") => {}
            Some(pvc) => problems.push(format!(
                "PersistentVolumeClaim/{claim}: accessModes {:?} lack ReadWriteMany: pods on different nodes must all mount it (use a ReadWriteMany storage class: NFS, CephFS, a cloud file store)",
                strings(&pvc["spec"]["accessModes"])
            )),
            None => problems.push(format!("PersistentVolumeClaim/{claim} is mounted but not in these manifests")),
        }
        if let Some(c) = &cluster {
            let paths = [
                ("model.path", &c["model"]["path"]),
                ("checkpoint.dir", &c["checkpoint"]["dir"]),
                ("data.train", &c["data"]["train"]),
            ];
            for (field, v) in paths {
                if let Some(p) = v.as_str().filter(|p| !p.starts_with(&format!("{at}/"))) {
                    problems.push(format!("cluster.yaml: {field} {p} is not on the shared volume ({at}/...): the workers would not see what the coordinator sees"));
                }
            }
        }
    }

    // One non-root identity, with fsGroup, for both pods.
    let identity = |pod: &Pod| {
        let s = &pod.spec["securityContext"];
        (number(&s["runAsUser"]), number(&s["fsGroup"]))
    };
    let (ci, wi) = (identity(&coordinator), identity(&workers));
    if ci != wi || ci.0.is_none_or(|u| u == 0) || ci.1.is_none() {
        problems.push(format!("the coordinator (runAsUser {:?}, fsGroup {:?}) and the workers (runAsUser {:?}, fsGroup {:?}) must run as the same non-root user with an fsGroup: the coordinator writes into checkpoint directories the workers created", ci.0, ci.1, wi.0, wi.1));
    }

    if !problems.is_empty() {
        return Err(DeploymentError::Problems(problems));
    }
    let (shared_claim, shared_path) = shared.unwrap_or_default();
    Ok(Deployment {
        world_size: parallelism,
        coordinator_job: cjob,
        worker_job: wjob,
        shared_claim,
        shared_path,
    })
}
