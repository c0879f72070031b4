//! The pods of RENDERED Kubernetes manifests, run from exported container images without a
//! kubelet: what the kubelet and the Job controller would do, done by hand, so that the
//! manifests a user applies are the ones that run here.
//!
//! Emulated, from the manifests: each container's `command`/`args` (with `$(VAR)` expansion),
//! `env` (`value`, ConfigMap and Secret keys, `fieldRef`s: the pod IP, name, namespace and the
//! completion-index annotation; `JOB_COMPLETION_INDEX` and `HOSTNAME` as the Job controller and
//! runtime set them), the image's own `Env`, `securityContext` (runAsUser/runAsGroup, fsGroup as
//! a supplementary group owning writable volumes, no capabilities), init containers, volumes
//! (ConfigMap and Secret files with their modes, one directory per PersistentVolumeClaim,
//! emptyDir) bind-mounted into the image's root filesystem in a private mount namespace, the
//! pod's host name (UTS namespace), and its network: each pod slot is a network namespace with
//! an address of its own, and a per-pod `/etc/hosts` resolves every Service (and the workers'
//! `HOSTNAME.SUBDOMAIN` names) to the addresses of the pods its selector picks, as cluster DNS
//! would. The Job controller's decisions come from the rendered `podFailurePolicy`,
//! `backoffLimit` and `backoffLimitPerIndex`.
//!
//! Not emulated: scheduling and nodes, resource requests and limits (no cgroups), the kubelet's
//! probe loop (the test sends the readiness probe's own request once), image pulls (the images
//! are built on this machine), Service virtual IPs and load balancing (a name resolves straight
//! to its one pod), a replaced pod's new IP (it keeps its slot's address), the controller's
//! back-off delays, seccomp, and the service-link environment variables.

use super::netns::Hosts;
use super::Launch;
use base64::Engine;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An image's exported root filesystem and configuration (`podman image inspect`).
pub struct Image {
    pub root: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Image {
    pub fn load(dir: &Path) -> Image {
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let env = config[0]["Config"]["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Image {
            root: dir.join("rootfs"),
            env,
        }
    }
}

/// Where pod `name` runs: its network namespace slot, host name and completion index.
#[derive(Clone)]
pub struct PodSlot {
    pub job: String,
    pub slot: usize,
    pub hostname: String,
    pub index: Option<u32>,
}

pub struct Cluster {
    pub docs: Vec<Value>,
    pub hosts: Hosts,
    pub dir: PathBuf,
    images: BTreeMap<String, Image>,
    /// Pods that exist: their slots, for DNS.
    pub pods: Vec<PodSlot>,
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("?")
}

impl Cluster {
    pub fn new(
        docs: Vec<Value>,
        hosts: Hosts,
        dir: PathBuf,
        images: BTreeMap<String, Image>,
    ) -> Self {
        Cluster {
            docs,
            hosts,
            dir,
            images,
            pods: Vec::new(),
        }
    }

    pub fn object(&self, kind: &str, wanted: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && name(d) == wanted)
            .unwrap_or_else(|| panic!("no {kind}/{wanted} in the rendered manifests"))
    }

    pub fn template(&self, job: &str) -> &Value {
        &self.object("Job", job)["spec"]["template"]
    }

    /// Every Service's names → the addresses of the pods its selector matches, plus each
    /// indexed pod's `HOSTNAME.SUBDOMAIN`.
    fn hosts_file(&self, me: &PodSlot) -> String {
        let mut lines = vec!["127.0.0.1 localhost".to_string()];
        let namespace = "default";
        for pod in &self.pods {
            let template = self.template(&pod.job);
            let ip = Hosts::address_of(pod.slot);
            if let Some(sub) = template["spec"]["subdomain"].as_str() {
                lines.push(format!(
                    "{ip} {h}.{sub}.{namespace}.svc.cluster.local {h}.{sub} {h}",
                    h = pod.hostname
                ));
            } else if pod.hostname == me.hostname {
                lines.push(format!("{ip} {}", pod.hostname));
            }
            let labels = &template["metadata"]["labels"];
            for svc in self.docs.iter().filter(|d| d["kind"] == "Service") {
                let selector = svc["spec"]["selector"].as_object();
                let matches = selector.is_some_and(|s| s.iter().all(|(k, v)| &labels[k] == v));
                if matches {
                    let s = name(svc);
                    lines.push(format!("{ip} {s}.{namespace}.svc.cluster.local {s}"));
                }
            }
        }
        lines.join("\n") + "\n"
    }

    /// Makes a volume's directory on this machine, as the kubelet would.
    fn volume(&self, pod: &PodSlot, volume: &Value, fs_group: u32) -> PathBuf {
        let vname = volume["name"].as_str().unwrap();
        let own = |path: &Path, mode: u32| {
            std::os::unix::fs::chown(path, Some(0), Some(fs_group)).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            let dir = self.dir.join("claims").join(claim);
            if !dir.exists() {
                std::fs::create_dir_all(&dir).unwrap();
                // fsGroup: the group owns the volume, setgid keeps new files in it.
                own(&dir, 0o2775);
            }
            return dir;
        }
        let dir = self.dir.join("volumes").join(&pod.hostname).join(vname);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (items, mode): (Vec<(String, Vec<u8>)>, u32) =
            if let Some(map) = volume["configMap"]["name"].as_str() {
                let data = self.object("ConfigMap", map)["data"].as_object().unwrap();
                let items = data
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().as_bytes().to_vec()))
                    .collect();
                let mode = volume["configMap"]["defaultMode"].as_u64().unwrap_or(0o644);
                (items, mode as u32)
            } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let data = self.object("Secret", secret)["data"].as_object().unwrap();
                let items = data
                    .iter()
                    .map(|(k, v)| {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v.as_str().unwrap())
                            .unwrap();
                        (k.clone(), bytes)
                    })
                    .collect();
                let mode = volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644);
                (items, mode as u32)
            } else if volume["emptyDir"].is_object() {
                own(&dir, 0o2777);
                return dir;
            } else {
                panic!("the harness cannot emulate volume {volume}");
            };
        own(&dir, 0o2755);
        for (key, bytes) in items {
            let file = dir.join(key);
            std::fs::write(&file, bytes).unwrap();
            own(&file, mode);
        }
        dir
    }

    /// The pod's main container (or init container `init`), started in its slot.
    pub fn start(&mut self, pod: &PodSlot, init: Option<&str>) -> Launch {
        if !self.pods.iter().any(|p| p.hostname == pod.hostname) {
            self.pods.retain(|p| p.slot != pod.slot);
            self.pods.push(pod.clone());
        }
        let template = self.template(&pod.job).clone();
        let spec = &template["spec"];
        let container = match init {
            Some(n) => spec["initContainers"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["name"] == n)),
            None => spec["containers"].as_array().and_then(|a| a.first()),
        }
        .unwrap_or_else(|| panic!("Job/{}: no container {init:?}", pod.job))
        .clone();
        let image_name = container["image"].as_str().unwrap();
        let image = self
            .images
            .get(image_name)
            .unwrap_or_else(|| panic!("no image built for {image_name}"));
        let security = &spec["securityContext"];
        let uid = security["runAsUser"].as_u64().expect("runAsUser") as u32;
        let gid = security["runAsGroup"].as_u64().unwrap_or(uid as u64) as u32;
        let fs_group = security["fsGroup"].as_u64().unwrap_or(gid as u64) as u32;
        let ip = Hosts::address_of(pod.slot);

        // Environment: the image's, then the container's.
        let mut env: Vec<(String, String)> = image.env.clone();
        let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v));
        };
        set(&mut env, "HOSTNAME", pod.hostname.clone());
        if let Some(i) = pod.index {
            set(&mut env, "JOB_COMPLETION_INDEX", i.to_string());
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().unwrap();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "status.podIP" => ip.clone(),
                    "metadata.name" => pod.hostname.clone(),
                    "metadata.namespace" => "default".into(),
                    "metadata.annotations['batch.kubernetes.io/job-completion-index']" => {
                        pod.index.expect("an indexed pod").to_string()
                    }
                    other => panic!("the harness cannot emulate fieldRef {other}"),
                }
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                let map = self.object("ConfigMap", r["name"].as_str().unwrap());
                map["data"][r["key"].as_str().unwrap()]
                    .as_str()
                    .unwrap()
                    .to_string()
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let secret = self.object("Secret", r["name"].as_str().unwrap());
                let b64 = secret["data"][r["key"].as_str().unwrap()].as_str().unwrap();
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap(),
                )
                .unwrap()
            } else {
                panic!("the harness cannot emulate env {e}");
            };
            set(&mut env, key, value);
        }
        let expand = |arg: &str| {
            let mut out = arg.to_string();
            for (k, v) in &env {
                out = out.replace(&format!("$({k})"), v);
            }
            out
        };
        let argv: Vec<String> = container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(container["args"].as_array().into_iter().flatten())
            .map(|a| expand(a.as_str().unwrap()))
            .collect();
        assert!(!argv.is_empty(), "the harness needs an explicit command");

        // The mounts, in a script run in a private mount and UTS namespace.
        let root = &image.root;
        let pod_dir = self.dir.join("pods").join(&pod.hostname);
        std::fs::create_dir_all(&pod_dir).unwrap();
        let hosts_file = pod_dir.join("hosts");
        // The runtime's mount point (an image need not have the file).
        if !root.join("etc/hosts").exists() {
            std::fs::write(root.join("etc/hosts"), "").unwrap();
        }
        std::fs::write(&hosts_file, self.hosts_file(pod)).unwrap();
        let q = |p: &Path| format!("'{}'", p.display());
        let mut script = vec![
            "set -eu".to_string(),
            format!("hostname {}", pod.hostname),
            format!("mount --rbind /dev {}", q(&root.join("dev"))),
            format!("mount --rbind /proc {}", q(&root.join("proc"))),
            format!("mount --rbind /sys {}", q(&root.join("sys"))),
            format!("mount -t tmpfs tmpfs {}", q(&root.join("tmp"))),
            format!(
                "mount --bind {} {}",
                q(&hosts_file),
                q(&root.join("etc/hosts"))
            ),
        ];
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap();
            let volume = spec["volumes"]
                .as_array()
                .and_then(|a| a.iter().find(|v| v["name"] == vname))
                .unwrap_or_else(|| panic!("volumeMount {vname} has no volume"));
            let source = self.volume(pod, volume, fs_group);
            let target = root.join(m["mountPath"].as_str().unwrap().trim_start_matches('/'));
            std::fs::create_dir_all(&target).unwrap();
            script.push(format!("mount --bind {} {}", q(&source), q(&target)));
            if m["readOnly"].as_bool() == Some(true) {
                script.push(format!("mount -o remount,bind,ro {}", q(&target)));
            }
        }
        let env_args: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("'{k}={}'", v.replace('\'', "'\\''")))
            .collect();
        let argv_q: Vec<String> = argv
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        script.push(format!(
            "exec chroot --userspec={uid}:{gid} --groups={fs_group} {} /usr/bin/env -i {} {}",
            q(root),
            env_args.join(" "),
            argv_q.join(" ")
        ));
        let script_file = pod_dir.join(format!("{}.sh", init.unwrap_or("main")));
        std::fs::write(&script_file, script.join("\n") + "\n").unwrap();
        let mut cmd = self.hosts.command(pod.slot, Path::new("unshare"));
        cmd.args(["--mount", "--uts", "--propagation", "private", "sh"])
            .arg(&script_file);
        Launch::spawn(cmd)
    }
}

/// What the Job controller does with a pod of `job` that ended with `code` (None: a signal):
/// "Complete", "FailJob", "Ignore" or "Count", from the rendered podFailurePolicy.
pub fn policy_action(job: &Value, container: &str, code: Option<i32>) -> &'static str {
    if code == Some(0) {
        return "Complete";
    }
    for rule in job["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let on = &rule["onExitCodes"];
        let (Some(code), Some(values)) = (code, on["values"].as_array()) else {
            continue;
        };
        if on["containerName"].as_str().is_some_and(|c| c != container) {
            continue;
        }
        let listed = values.iter().any(|v| v.as_i64() == Some(code as i64));
        let hit = match on["operator"].as_str() {
            Some("In") => listed,
            Some("NotIn") => !listed,
            _ => false,
        };
        if hit {
            return match rule["action"].as_str() {
                Some("FailJob") => "FailJob",
                Some("Ignore") => "Ignore",
                Some("FailIndex") => "FailIndex",
                _ => "Count",
            };
        }
    }
    "Count"
}

/// Runs `cmd` to completion and says whether it succeeded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}
