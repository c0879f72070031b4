//! Where workers reach the coordinator: the listening socket, the URL workers dial, and the job
//! token every call must carry. The one place on the coordinator's side that opens a socket for
//! workers (TLS will be added here).

use crate::config::{JobConfig, LauncherKind};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot listen for {purpose} on {addr} ({field}): {source}")]
    Bind {
        addr: SocketAddr,
        purpose: &'static str,
        field: &'static str,
        source: std::io::Error,
    },
    #[error(
        "launcher: external needs a job token, and neither cluster.token_file nor {} is set",
        ferrotune_proto::TOKEN_ENV
    )]
    NoToken,
}

impl EndpointError {
    pub fn hint(&self) -> String {
        match self {
            EndpointError::Bind { source, .. } => match source.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "another process holds that port: pick a free one, or port 0 for any free port".into()
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "that address is not one of this host's: use one of its addresses, or 0.0.0.0 for all".into()
                }
                _ => "choose an address of this host and a port you may bind (ports below 1024 need privileges)".into(),
            },
            EndpointError::NoToken => format!(
                "write a random secret into a file (`openssl rand -hex 24 > job.token`), name it in cluster.token_file, and give the workers the same file (--token-file) or {}",
                ferrotune_proto::TOKEN_ENV
            ),
        }
    }
}

/// Binds the gRPC listener. Done before any dataset is read or worker started, so a bad address
/// costs nothing.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, EndpointError> {
    bind_for(addr, "workers", "cluster.listen")
}

/// Binds the dashboard and metrics listener (`observe.listen`), with the same early refusal.
pub fn bind_observer(addr: SocketAddr) -> Result<TcpListener, EndpointError> {
    bind_for(addr, "the dashboard and /metrics", "observe.listen")
}

fn bind_for(
    addr: SocketAddr,
    purpose: &'static str,
    field: &'static str,
) -> Result<TcpListener, EndpointError> {
    let error = |source| EndpointError::Bind {
        addr,
        purpose,
        field,
        source,
    };
    let listener = TcpListener::bind(addr).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    Ok(listener)
}

/// The URL workers dial. A concrete listen address is used as it is; for a wildcard one
/// (0.0.0.0, ::) `cluster.advertise` names the host, else this host's name is resolved and its
/// first non-loopback address taken (what other hosts of a cluster reach it at).
pub fn worker_url(bound: SocketAddr, advertise: Option<&str>) -> String {
    let port = bound.port();
    if let Some(host) = advertise {
        return match host.parse::<IpAddr>() {
            Ok(ip) => format!("http://{}", SocketAddr::new(ip, port)),
            Err(_) => format!("http://{host}:{port}"),
        };
    }
    let ip = if bound.ip().is_unspecified() {
        host_address().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        bound.ip()
    };
    format!("http://{}", SocketAddr::new(ip, port))
}

fn host_address() -> Option<IpAddr> {
    let name = crate::launcher::local::hostname();
    let addrs: Vec<IpAddr> = (name.as_str(), 0)
        .to_socket_addrs()
        .ok()?
        .map(|a| a.ip())
        .collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .or_else(|| addrs.iter().find(|ip| !ip.is_loopback()))
        .or(addrs.first())
        .copied()
}

/// The job token: `cluster.token_file` wins, then FERROTUNE_JOB_TOKEN for external workers
/// (who must be given it by whoever starts them); local and Slurm workers are started by the
/// coordinator, which makes a fresh one per job and hands it over in their environment.
pub fn job_token(
    config: &JobConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, EndpointError> {
    if let Some(t) = &config.cluster.token_from_file {
        return Ok(t.clone());
    }
    match config.cluster.launcher {
        LauncherKind::External => env(ferrotune_proto::TOKEN_ENV)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or(EndpointError::NoToken),
        LauncherKind::Local | LauncherKind::Slurm => Ok(random_token()),
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concrete_addresses_are_dialled_as_bound_and_advertise_wins() {
        let bound: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        assert_eq!(worker_url(bound, None), "http://10.1.2.3:5000");
        assert_eq!(
            worker_url(bound, Some("coord.svc")),
            "http://coord.svc:5000"
        );
        assert_eq!(worker_url(bound, Some("fd00::1")), "http://[fd00::1]:5000");
        let any: SocketAddr = "0.0.0.0:7".parse().unwrap();
        let url = worker_url(any, None);
        assert!(url.starts_with("http://") && url.ends_with(":7"), "{url}");
        assert!(
            !url.contains("0.0.0.0"),
            "a wildcard is not dialable: {url}"
        );
    }

    #[test]
    fn a_port_in_use_is_a_bind_error_with_a_hint() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = bind(held.local_addr().unwrap()).unwrap_err();
        assert!(e
            .to_string()
            .contains("cannot listen for workers on 127.0.0.1:"));
        assert!(e.hint().contains("pick a free one"), "{}", e.hint());
    }

    #[test]
    fn token_file_wins_and_external_needs_a_token() {
        let tmp = tempfile::tempdir().unwrap();
        let text = crate::config::tests::fixture(tmp.path()).replace(
            "launcher: local",
            "launcher: external\n  listen: 127.0.0.1:0",
        );
        let config = crate::config::parse(&text, tmp.path()).unwrap();
        assert!(matches!(
            job_token(&config, &|_| None),
            Err(EndpointError::NoToken)
        ));
        let from_env = |k: &str| (k == ferrotune_proto::TOKEN_ENV).then(|| " s3 \n".to_string());
        assert_eq!(job_token(&config, &from_env).unwrap(), "s3");

        std::fs::write(tmp.path().join("job.token"), "  from-file\n").unwrap();
        let text = text.replace("listen:", "token_file: job.token\n  listen:");
        let config = crate::config::parse(&text, tmp.path()).unwrap();
        assert_eq!(job_token(&config, &from_env).unwrap(), "from-file");

        let local =
            crate::config::parse(&crate::config::tests::fixture(tmp.path()), tmp.path()).unwrap();
        let (a, b) = (
            job_token(&local, &|_| None).unwrap(),
            job_token(&local, &|_| None).unwrap(),
        );
        assert_eq!(a.len(), 48);
        assert_ne!(a, b, "a fresh token per job");
    }
}
