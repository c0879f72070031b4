//! The `cluster:` section: which launcher starts the workers, how many, where the coordinator
//! listens, the job token, and the liveness timings.

use super::devices::{CollectiveSetting, DeviceConfig, DeviceSetting};
use super::{Checks, Spanned};
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// Child processes of the coordinator on this host.
    Local,
    /// `srun` steps inside the Slurm allocation the coordinator runs in.
    Slurm,
    /// Someone else (a Kubernetes Job, a script on each host) starts the workers.
    External,
}

impl LauncherKind {
    pub fn name(self) -> &'static str {
        match self {
            LauncherKind::Local => "local",
            LauncherKind::Slurm => "slurm",
            LauncherKind::External => "external",
        }
    }
}

/// `world_size: 4` or `world_size: auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WorldSizeSetting {
    Count(u64),
    Auto,
    Other(String),
}

impl<'de> Deserialize<'de> for WorldSizeSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WorldSizeSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number of workers or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(WorldSizeSetting::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(match u64::try_from(v) {
                    Ok(n) => WorldSizeSetting::Count(n),
                    Err(_) => WorldSizeSetting::Other(v.to_string()),
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(if v == "auto" {
                    WorldSizeSetting::Auto
                } else {
                    WorldSizeSetting::Other(v.to_string())
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    launcher: LauncherKind,
    world_size: Spanned<WorldSizeSetting>,
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    advertise: Option<Spanned<String>>,
    #[serde(default)]
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    threads_per_worker: Option<Spanned<u32>>,
    #[serde(default = "defaults::heartbeat_interval_s")]
    heartbeat_interval_s: Spanned<f64>,
    #[serde(default = "defaults::heartbeat_timeout_s")]
    heartbeat_timeout_s: Spanned<f64>,
    #[serde(default = "defaults::rendezvous_timeout_s")]
    rendezvous_timeout_s: Spanned<f64>,
    #[serde(default = "defaults::collective_timeout_s")]
    collective_timeout_s: Spanned<f64>,
    #[serde(default = "defaults::bucket_mb")]
    bucket_mb: Spanned<f64>,
    #[serde(default)]
    worker_binary: Option<Spanned<String>>,
    #[serde(default = "defaults::max_restarts")]
    max_restarts: Spanned<u32>,
    #[serde(default = "defaults::rejoin_timeout_s")]
    rejoin_timeout_s: Spanned<f64>,
    #[serde(default = "defaults::step_timeout_s")]
    step_timeout_s: Spanned<f64>,
    #[serde(default)]
    resume: Option<Spanned<ResumeSetting>>,
    #[serde(default)]
    min_workers: Option<Spanned<u32>>,
    #[serde(default)]
    device: Option<Spanned<DeviceSetting>>,
    #[serde(default)]
    collective: Option<Spanned<CollectiveSetting>>,
    #[serde(default)]
    gpus_per_node: Option<Spanned<u32>>,
}

/// `resume: auto` continues from the newest committed checkpoint when there is one (a
/// restarted coordinator needs no other command line); `never` (the default) starts afresh
/// unless `--resume` is given.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ResumeSetting {
    Auto,
    #[default]
    Never,
}

mod defaults {
    use super::Spanned;
    use serde_saphyr::Location;

    fn unspanned<T>(value: T) -> Spanned<T> {
        Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
    }
    pub fn heartbeat_interval_s() -> Spanned<f64> {
        unspanned(1.0)
    }
    pub fn heartbeat_timeout_s() -> Spanned<f64> {
        unspanned(10.0)
    }
    pub fn rendezvous_timeout_s() -> Spanned<f64> {
        unspanned(120.0)
    }
    pub fn collective_timeout_s() -> Spanned<f64> {
        unspanned(60.0)
    }
    pub fn bucket_mb() -> Spanned<f64> {
        unspanned(25.0)
    }
    pub fn max_restarts() -> Spanned<u32> {
        unspanned(3)
    }
    pub fn rejoin_timeout_s() -> Spanned<f64> {
        unspanned(120.0)
    }
    pub fn step_timeout_s() -> Spanned<f64> {
        unspanned(600.0)
    }
}

/// Environment variables that `world_size: auto` reads, in order.
pub const WORLD_SIZE_ENVS: [&str; 2] = ["SLURM_NTASKS", "FERROTUNE_WORLD_SIZE"];

/// The validated `cluster:` section.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub launcher: LauncherKind,
    pub world_size: u32,
    /// `world_size: auto` that only `launch` can resolve (loaded for `validate` without the
    /// variables); `world_size` is then a placeholder 1.
    pub world_size_deferred: bool,
    /// Where the gRPC server binds: the config's `listen`, else the launcher's default
    /// (`local`: 127.0.0.1:0, `slurm`: 0.0.0.0:0; `external` has none and requires it).
    pub listen: SocketAddr,
    /// Host or address workers dial when `listen` is a wildcard address.
    pub advertise: Option<String>,
    /// The job token read from `token_file`, whitespace trimmed.
    pub token_from_file: Option<String>,
    pub threads_per_worker: Option<u32>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub rendezvous_timeout: Duration,
    pub collective_timeout: Duration,
    pub bucket_bytes: u64,
    pub worker_binary: Option<PathBuf>,
    /// Restarts (re-formed groups after a lost worker) allowed for the whole job.
    pub max_restarts: u32,
    /// How long a re-formed group waits for its workers to register again.
    pub rejoin_timeout: Duration,
    /// How long the workers may train without reporting a step before the group is re-formed.
    pub step_timeout: Duration,
    pub resume: ResumeSetting,
    /// The fewest workers the job continues on when lost ones do not come back (default: all).
    pub min_workers: u32,
    pub devices: DeviceConfig,
}

impl Checks<'_> {
    pub(super) fn cluster(
        &mut self,
        c: &ClusterSection,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> ClusterConfig {
        let devices = self.devices(
            c.device.as_ref(),
            c.collective.as_ref(),
            c.gpus_per_node.as_ref(),
        );
        // The local launcher runs every worker on this host: one per GPU when it has them.
        let local_gpus = devices
            .gpus_per_node
            .filter(|_| c.launcher == LauncherKind::Local);
        let world_size = match (&c.world_size.value, local_gpus) {
            (WorldSizeSetting::Auto, Some(gpus)) => gpus,
            _ => self.world_size(&c.world_size, env),
        };
        let world_size_deferred = matches!(c.world_size.value, WorldSizeSetting::Auto)
            && local_gpus.is_none()
            && WORLD_SIZE_ENVS.iter().all(|name| env(name).is_none());
        if let Some(gpus) = local_gpus.filter(|&g| world_size > g) {
            self.push(
                &c.world_size,
                "cluster.world_size",
                format!("the local launcher runs every worker on this host, which has cluster.gpus_per_node = {gpus} GPUs, but world_size is {world_size}"),
                "set world_size to at most gpus_per_node (or `auto`: one worker per GPU), or use launcher: slurm across hosts",
            );
        }
        let listen = match (&c.listen, c.launcher) {
            (Some(l), _) => match l.value.parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    self.push(
                        l,
                        "cluster.listen",
                        format!("`{}` is not an IP address with a port", l.value),
                        "write ADDRESS:PORT, e.g. 0.0.0.0:50051 (every interface) or 10.0.0.5:0 (a free port)",
                    );
                    SocketAddr::from(([127, 0, 0, 1], 0))
                }
            },
            (None, LauncherKind::Slurm) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (None, LauncherKind::Local) => SocketAddr::from(([127, 0, 0, 1], 0)),
            (None, LauncherKind::External) => {
                self.push(
                    &c.world_size,
                    "cluster.listen",
                    "launcher: external needs cluster.listen: workers started elsewhere must know where to dial".into(),
                    "add `listen: 0.0.0.0:50051` (a fixed port the workers' --coordinator URL names) under cluster:",
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        let advertise = c.advertise.as_ref().map(|a| {
            let host = a.value.trim();
            if host.is_empty() || host.contains(['/', ' ']) {
                self.push(
                    a,
                    "cluster.advertise",
                    format!("`{}` is not a host name or address", a.value),
                    "name the host or address workers reach the coordinator at, without port or scheme",
                );
            }
            host.to_string()
        });
        let token_from_file = c.token_file.as_ref().and_then(|t| self.token_file(t));
        let heartbeat_interval =
            self.seconds(&c.heartbeat_interval_s, "cluster.heartbeat_interval_s");
        let heartbeat_timeout = self.seconds(&c.heartbeat_timeout_s, "cluster.heartbeat_timeout_s");
        if heartbeat_timeout <= heartbeat_interval {
            self.push(
                &c.heartbeat_timeout_s,
                "cluster.heartbeat_timeout_s",
                "must be longer than cluster.heartbeat_interval_s".into(),
                "allow several heartbeats per timeout, e.g. interval 1, timeout 10",
            );
        }
        let rendezvous_timeout =
            self.seconds(&c.rendezvous_timeout_s, "cluster.rendezvous_timeout_s");
        let collective_timeout =
            self.seconds(&c.collective_timeout_s, "cluster.collective_timeout_s");
        let bucket_mb = self.finite_at_least(&c.bucket_mb, "cluster.bucket_mb", 0.0, true);
        let rejoin_timeout = self.seconds(&c.rejoin_timeout_s, "cluster.rejoin_timeout_s");
        let step_timeout = self.seconds(&c.step_timeout_s, "cluster.step_timeout_s");
        let min_workers = match &c.min_workers {
            None => world_size,
            // `world_size: auto` is resolved at launch; `validate` cannot compare.
            Some(m) if world_size_deferred && m.value >= 1 => m.value,
            Some(m) if m.value >= 1 && m.value <= world_size => m.value,
            Some(m) => {
                self.push(
                    m,
                    "cluster.min_workers",
                    format!(
                        "must be between 1 and cluster.world_size ({world_size}), got {}",
                        m.value
                    ),
                    "set the fewest workers the job may continue on, or leave it out to require all of them",
                );
                world_size
            }
        };
        ClusterConfig {
            launcher: c.launcher,
            world_size,
            world_size_deferred,
            listen,
            advertise,
            token_from_file,
            threads_per_worker: c
                .threads_per_worker
                .as_ref()
                .map(|t| self.positive_u32(t, "cluster.threads_per_worker")),
            heartbeat_interval,
            heartbeat_timeout,
            rendezvous_timeout,
            collective_timeout,
            bucket_bytes: (bucket_mb * 1024.0 * 1024.0).max(4.0) as u64,
            worker_binary: c
                .worker_binary
                .as_ref()
                .map(|b| self.existing(b, "cluster.worker_binary", false)),
            max_restarts: c.max_restarts.value,
            rejoin_timeout,
            step_timeout,
            resume: c.resume.as_ref().map(|r| r.value).unwrap_or_default(),
            min_workers,
            devices,
        }
    }

    fn world_size(
        &mut self,
        v: &Spanned<WorldSizeSetting>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> u32 {
        const FIELD: &str = "cluster.world_size";
        match &v.value {
            WorldSizeSetting::Count(n) => match u32::try_from(*n) {
                Ok(0) => {
                    self.push(
                        v,
                        FIELD,
                        "must be at least 1, got 0".into(),
                        "set a positive whole number, or `auto`",
                    );
                    1
                }
                Ok(n) => {
                    // Set by deploy/kubernetes from the worker Job's parallelism: a number here
                    // that disagrees would wait for workers that are never started.
                    let env_size = env("FERROTUNE_WORLD_SIZE");
                    if let Some(m) = env_size.filter(|m| m.trim().parse::<u32>().ok() != Some(n)) {
                        self.push(
                            v,
                            FIELD,
                            format!("is {n} but FERROTUNE_WORLD_SIZE is {} (on Kubernetes: the worker Job's parallelism)", m.trim()),
                            "set `world_size: auto` so the job follows FERROTUNE_WORLD_SIZE, or make the two agree",
                        );
                    }
                    n
                }
                Err(_) => {
                    self.push(
                        v,
                        FIELD,
                        format!("{n} workers is more than supported"),
                        "set a smaller number",
                    );
                    1
                }
            },
            WorldSizeSetting::Other(text) => {
                self.push(
                    v,
                    FIELD,
                    format!("expected a whole number of workers or `auto`, got `{text}`"),
                    "write e.g. `world_size: 4`, or `world_size: auto` to take SLURM_NTASKS or FERROTUNE_WORLD_SIZE",
                );
                1
            }
            WorldSizeSetting::Auto => {
                for name in WORLD_SIZE_ENVS {
                    let Some(value) = env(name) else { continue };
                    match value.trim().parse::<u32>() {
                        Ok(n) if n > 0 => return n,
                        _ => {
                            self.push(
                                v,
                                FIELD,
                                format!("`auto` read {name}={value:?}, which is not a positive whole number"),
                                &format!("fix {name}, or write the number of workers here"),
                            );
                            return 1;
                        }
                    }
                }
                if self.purpose == super::Purpose::Validate {
                    return 1;
                }
                self.push(
                    v,
                    FIELD,
                    "`auto` found neither SLURM_NTASKS (set inside a Slurm allocation) nor FERROTUNE_WORLD_SIZE".into(),
                    "run inside `sbatch`/`salloc`, export FERROTUNE_WORLD_SIZE, or write the number of workers here",
                );
                1
            }
        }
    }

    /// The token in `token_file` (relative to the config's directory), trimmed; None after
    /// recording an issue.
    fn token_file(&mut self, t: &Spanned<String>) -> Option<String> {
        const FIELD: &str = "cluster.token_file";
        let path = self.resolve(&t.value);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let token = text.trim();
                let printable = token.bytes().all(|b| (0x21..0x7f).contains(&b));
                if token.is_empty() || !printable {
                    self.push(
                        t,
                        FIELD,
                        format!(
                            "{} holds no usable token (it must be one word of printable ASCII)",
                            path.display()
                        ),
                        "write a random secret into it, e.g. `openssl rand -hex 24 > job.token`",
                    );
                    None
                } else {
                    Some(token.to_string())
                }
            }
            Err(e) => {
                self.push(
                    t,
                    FIELD,
                    format!("cannot read {}: {e}", path.display()),
                    "point it at a readable file holding the job token; relative paths start at the directory of the config file",
                );
                None
            }
        }
    }
}
