//! Hosts as Linux network namespaces: each host has its own address on a bridge that lives in a
//! namespace of its own, so nothing is added to this machine's own network. Needs root and `ip`.
//! Everything is deleted on drop.

use std::process::{Command, Stdio};

/// Under CI=true a missing prerequisite fails the test; elsewhere the test is skipped with the
/// reason. Returns whether the test may go on.
pub fn prerequisite(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} (required under CI=true)");
    }
    eprintln!("skipping: {what}");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Hosts {
    switch: String,
    names: Vec<String>,
}

impl Hosts {
    /// `n` hosts with addresses 10.77.0.1, 10.77.0.2, ... on one bridge. None when the test
    /// must be skipped.
    pub fn new(n: usize) -> Option<Hosts> {
        let has_ip = Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !prerequisite(
            is_root() && has_ip,
            "network namespaces need root and iproute2",
        ) {
            return None;
        }
        let id = std::process::id() % 100_000;
        let hosts = Hosts {
            switch: format!("ft{id}sw"),
            names: (0..n).map(|i| format!("ft{id}h{i}")).collect(),
        };
        ip(&["netns", "add", &hosts.switch]);
        ip(&["-n", &hosts.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hosts.switch, "link", "set", "br0", "up"]);
        for (i, ns) in hosts.names.iter().enumerate() {
            let port = format!("p{i}");
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &hosts.switch,
            ]);
            ip(&["-n", &hosts.switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &hosts.switch, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", Hosts::address_of(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        Some(hosts)
    }

    /// Host `i`'s namespace (under /run/netns).
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Host `i`'s address.
    pub fn address_of(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// A command that runs `program` inside host `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i]]).arg(program);
        cmd
    }

    /// Takes host `i`'s port on the bridge down: its packets go nowhere, as with a pulled cable.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), "down"]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.names.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
