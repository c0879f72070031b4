//! Who this worker is, from its flags and the environment its scheduler gave it: the job token,
//! a worker id stable across restarts of the same slot, the host name ranks are ordered by, the
//! index among the workers of that host, and the address its collective is reached at.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no job token: set {} or pass --token-file PATH (the launcher does this for local and Slurm workers)", ferrotune_proto::TOKEN_ENV)]
    NoToken,
    #[error("--token-file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--token-file {}: the file holds no token", path.display())]
    EmptyToken { path: PathBuf },
    #[error("{name}={value:?} is not a whole number (it gives this worker's local index)")]
    BadIndex { name: &'static str, value: String },
    #[error("--coordinator {url}: {why}")]
    Coordinator { url: String, why: String },
}

/// What the flags said; `None` where the environment decides.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub token_file: Option<PathBuf>,
    pub worker_id: Option<String>,
    pub host: Option<String>,
    pub local_index: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub token: String,
    pub worker_id: String,
    pub host: String,
    pub local_index: u32,
}

pub fn kernel_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Resolves every field. `env` looks up environment variables, `hostname` is the kernel's.
pub fn resolve(
    flags: &Flags,
    env: &dyn Fn(&str) -> Option<String>,
    hostname: &str,
) -> Result<Resolved, IdentityError> {
    let token = match &flags.token_file {
        Some(path) => read_token(path)?,
        None => env(ferrotune_proto::TOKEN_ENV)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or(IdentityError::NoToken)?,
    };
    // Several "hosts" can share one kernel (network namespaces, two slurmd on one machine), so
    // the scheduler's node name comes before the kernel's.
    let host = flags
        .host
        .clone()
        .or_else(|| env("SLURMD_NODENAME"))
        .unwrap_or_else(|| hostname.to_string());
    let local_index = match flags.local_index {
        Some(i) => i,
        None => local_index_from_env(env)?,
    };
    let worker_id = match &flags.worker_id {
        Some(id) => id.clone(),
        None => match (env("SLURM_JOB_ID"), env("SLURM_PROCID")) {
            (Some(job), Some(proc_id)) => format!("{job}.{proc_id}"),
            // An Indexed Job's pod is named after its index and keeps the name when replaced.
            _ if env("JOB_COMPLETION_INDEX").is_some() => hostname.to_string(),
            _ => format!("{host}:{local_index}"),
        },
    };
    Ok(Resolved {
        token,
        worker_id,
        host,
        local_index,
    })
}

fn local_index_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<u32, IdentityError> {
    for name in ["SLURM_LOCALID", "LOCAL_RANK"] {
        if let Some(value) = env(name) {
            return value
                .trim()
                .parse()
                .map_err(|_| IdentityError::BadIndex { name, value });
        }
    }
    // Under an Indexed Job (JOB_COMPLETION_INDEX set) each pod is a host of its own with one
    // worker, so 0 there too.
    Ok(0)
}

fn read_token(path: &Path) -> Result<String, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(IdentityError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

/// The address peers dial to reach this worker's collective: `advertise` if given, the bind
/// address if it is a concrete one, else this host's address on the route to the coordinator
/// (the interface other cluster hosts share with it). No packet is sent to find it.
pub fn advertised_address(
    bind: IpAddr,
    advertise: Option<&str>,
    coordinator_url: &str,
) -> Result<String, IdentityError> {
    if let Some(a) = advertise {
        return Ok(a.to_string());
    }
    if !bind.is_unspecified() {
        return Ok(bind.to_string());
    }
    let bad = |why: String| IdentityError::Coordinator {
        url: coordinator_url.into(),
        why,
    };
    let authority = coordinator_url
        .split_once("://")
        .map_or(coordinator_url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let target: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve `{authority}`: {e}")))?
        .next()
        .ok_or_else(|| bad(format!("`{authority}` resolves to no address")))?;
    let local = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    // connect(2) on a UDP socket only asks the kernel for a route.
    let socket = UdpSocket::bind(local).map_err(|e| bad(e.to_string()))?;
    socket
        .connect(target)
        .map_err(|e| bad(format!("no route to {target}: {e}")))?;
    let ip = socket.local_addr().map_err(|e| bad(e.to_string()))?.ip();
    Ok(ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn slurm_tasks_take_node_name_local_id_and_job_task_id() {
        let env = env_of(&[
            ("FERROTUNE_JOB_TOKEN", "t"),
            ("SLURMD_NODENAME", "n2"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_JOB_ID", "41"),
            ("SLURM_PROCID", "7"),
        ]);
        let r = resolve(&Flags::default(), &env, "box").unwrap();
        assert_eq!(
            r,
            Resolved {
                token: "t".into(),
                worker_id: "41.7".into(),
                host: "n2".into(),
                local_index: 3
            }
        );
    }

    #[test]
    fn indexed_job_pods_use_their_hostname_and_flags_win() {
        let env = env_of(&[("FERROTUNE_JOB_TOKEN", "t"), ("JOB_COMPLETION_INDEX", "2")]);
        let r = resolve(&Flags::default(), &env, "train-workers-2").unwrap();
        assert_eq!(r.worker_id, "train-workers-2");
        assert_eq!((r.host.as_str(), r.local_index), ("train-workers-2", 0));

        let flags = Flags {
            worker_id: Some("w".into()),
            host: Some("h".into()),
            local_index: Some(5),
            token_file: None,
        };
        let r = resolve(&flags, &env, "pod").unwrap();
        assert_eq!(
            (r.worker_id.as_str(), r.host.as_str(), r.local_index),
            ("w", "h", 5)
        );
    }

    #[test]
    fn plain_hosts_are_named_host_and_index() {
        let env = env_of(&[("FERROTUNE_JOB_TOKEN", "t"), ("LOCAL_RANK", "1")]);
        let r = resolve(&Flags::default(), &env, "gpu7").unwrap();
        assert_eq!(r.worker_id, "gpu7:1");
        let bad = env_of(&[("FERROTUNE_JOB_TOKEN", "t"), ("LOCAL_RANK", "x")]);
        assert!(resolve(&Flags::default(), &bad, "h")
            .unwrap_err()
            .to_string()
            .contains("LOCAL_RANK=\"x\""));
    }

    #[test]
    fn token_file_wins_over_the_environment_and_is_trimmed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        std::fs::write(&path, "  secret \n").unwrap();
        let flags = Flags {
            token_file: Some(path.clone()),
            ..Flags::default()
        };
        let env = env_of(&[("FERROTUNE_JOB_TOKEN", "other")]);
        assert_eq!(resolve(&flags, &env, "h").unwrap().token, "secret");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            resolve(&flags, &env, "h"),
            Err(IdentityError::EmptyToken { .. })
        ));
        assert!(matches!(
            resolve(&Flags::default(), &env_of(&[]), "h"),
            Err(IdentityError::NoToken)
        ));
    }

    #[test]
    fn the_advertised_address_is_the_route_to_the_coordinator() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert_eq!(
            advertised_address(any, None, "http://127.0.0.1:5000").unwrap(),
            "127.0.0.1"
        );
        assert_eq!(
            advertised_address("127.0.0.2".parse().unwrap(), None, "http://x:1").unwrap(),
            "127.0.0.2"
        );
        assert_eq!(
            advertised_address(any, Some("w.example"), "http://127.0.0.1:5000").unwrap(),
            "w.example"
        );
        assert!(advertised_address(any, None, "http://no-such-host.invalid:1").is_err());
    }
}
