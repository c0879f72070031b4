//! The `observe:` section: where the coordinator serves its dashboard, `/metrics` and
//! `/api/status`.

use super::{Checks, Spanned};
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ObserveSection {
    #[serde(default)]
    listen: Option<Spanned<String>>,
}

/// The validated `observe:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveConfig {
    /// Default 127.0.0.1:0 (this host only, a free port); 0.0.0.0:9090 to let Prometheus in.
    pub listen: SocketAddr,
}

impl Checks<'_> {
    pub(super) fn observe(&mut self, o: Option<&ObserveSection>) -> ObserveConfig {
        let default = SocketAddr::from(([127, 0, 0, 1], 0));
        let listen = match o.and_then(|o| o.listen.as_ref()) {
            None => default,
            Some(l) => match l.value.parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => {
                    self.push(
                        l,
                        "observe.listen",
                        format!("`{}` is not an IP address with a port", l.value),
                        "write ADDRESS:PORT, e.g. 127.0.0.1:0 (this host, a free port) or 0.0.0.0:9090 (for a Prometheus elsewhere)",
                    );
                    default
                }
            },
        };
        ObserveConfig { listen }
    }
}
