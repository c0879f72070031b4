//! One coordinator per checkpoint directory.
//!
//! Two coordinators on one `checkpoint.dir` would both commit `step-N`, remove each other's
//! staging directories and apply retention to each other's checkpoints. A live job therefore
//! owns its directory through a lease file: an owner record (job, host, pid, start time), an
//! epoch that grows with every new owner, and the time of the last renewal. The owner renews it
//! every quarter of the timeout; a second `launch` is refused while the lease is fresh, and may
//! take it over once it has not been renewed for the timeout (its owner crashed). `flock` is not
//! used: on shared filesystems (NFS, Lustre) it is unreliable or a no-op.
//!
//! Every write goes to a temporary file renamed over the lease, so a reader never sees a torn
//! record. Expiry compares wall clocks: hosts that may run the coordinator must keep time in
//! sync (NTP), as every cluster does; a skew is added to the timeout's margin of safety only.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const LEASE_FILE: &str = ".ferrotune-lease.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Unique per coordinator process: host, pid and start time together.
    pub id: String,
    pub job: String,
    pub host: String,
    pub pid: u32,
    pub started_unix_ms: u64,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} (coordinator pid {} on host {}, started {})",
            self.job,
            self.pid,
            self.host,
            format_unix_ms(self.started_unix_ms)
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    owner: Owner,
    epoch: u64,
    renewed_unix_ms: u64,
    timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "checkpoint directory {} is in use by {owner} (lease renewed {}s ago)",
        dir.display(), renewed_ago.as_secs()
    )]
    Held {
        dir: PathBuf,
        owner: Box<Owner>,
        renewed_ago: Duration,
        /// How long until a lease that is not renewed again may be taken over.
        expires_in: Duration,
    },
    #[error("the lease on {} was taken over by {}", dir.display(), by.as_ref().map_or_else(
        || "another coordinator (which has since released it)".to_string(),
        |o| o.to_string()
    ))]
    Lost {
        dir: PathBuf,
        by: Option<Box<Owner>>,
    },
    #[error("{} is not a lease this coordinator can read ({message})", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LeaseError {
    pub fn hint(&self) -> String {
        match self {
            LeaseError::Held { expires_in, .. } => format!(
                "wait for that job to end, or give this one another checkpoint.dir; if its \
                 coordinator died, the lease can be taken over in {}s",
                expires_in.as_secs() + 1
            ),
            LeaseError::Unreadable { path, .. } => format!(
                "if no job uses this directory, delete {} and launch again",
                path.display()
            ),
            _ => "check that checkpoint.dir is writable from this host".into(),
        }
    }
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn format_unix_ms(ms: u64) -> String {
    // Seconds since the epoch, UTC, as `date -d @S` reads them; no calendar crate for a message.
    format!("@{}", ms / 1000)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether the owner was a coordinator on this host that is no longer running: then its lease
/// need not expire first (a SIGKILLed job resumed at once). Owners on other hosts cannot be
/// checked and are trusted until their lease expires.
fn owner_is_gone(owner: &Owner, this_host: &str) -> bool {
    if owner.host != this_host || owner.pid == 0 {
        return false;
    }
    // A live process with that pid that is not a coordinator reused the pid of a dead one.
    match std::fs::read(format!("/proc/{}/cmdline", owner.pid)) {
        Ok(cmdline) => !String::from_utf8_lossy(&cmdline).contains("coordinator"),
        Err(_) => true,
    }
}

/// This coordinator's hold on a checkpoint directory.
#[derive(Debug)]
pub struct Lease {
    dir: PathBuf,
    path: PathBuf,
    owner: Owner,
    timeout: Duration,
    epoch: u64,
}

impl Lease {
    /// Takes the lease on `dir` (created if missing) for `job`, or says who holds it.
    pub fn acquire(dir: &Path, job: &str, timeout: Duration) -> Result<Lease, LeaseError> {
        let now = now_unix_ms();
        let host = host_name();
        let pid = std::process::id();
        let owner = Owner {
            id: format!("{host}:{pid}:{now}"),
            job: job.to_string(),
            host,
            pid,
            started_unix_ms: now,
        };
        Self::acquire_as(dir, owner, timeout, now)
    }

    /// Like [`Lease::acquire`], for a coordinator its scheduler started again (`resume: auto`):
    /// a lease of the same job held from another host may be its own predecessor's, whose pod
    /// or node died without releasing it. It watches the lease instead of refusing at once: a
    /// holder that renews it while watched is alive and the launch is refused as before; a
    /// lease nobody renews is taken over once it expires. `waiting` is told once.
    pub fn acquire_or_wait(
        dir: &Path,
        job: &str,
        timeout: Duration,
        waiting: impl FnOnce(&LeaseError),
    ) -> Result<Lease, LeaseError> {
        let first = match Self::acquire(dir, job, timeout) {
            Err(e @ LeaseError::Held { .. }) if matches!(&e, LeaseError::Held { owner, .. } if owner.job == job) => {
                e
            }
            other => return other,
        };
        let LeaseError::Held { expires_in, .. } = &first else {
            unreachable!("matched above")
        };
        let path = dir.join(LEASE_FILE);
        let renewed_at = |p: &Path| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|t| serde_json::from_str::<Record>(&t).ok())
                .map(|r| (r.owner.id, r.renewed_unix_ms))
        };
        let seen = renewed_at(&path);
        // A second past the expiry, so that the takeover is not refused as still fresh.
        let deadline = std::time::Instant::now() + *expires_in + Duration::from_secs(1);
        waiting(&first);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            if renewed_at(&path) != seen {
                break;
            }
        }
        Self::acquire(dir, job, timeout)
    }

    fn acquire_as(
        dir: &Path,
        owner: Owner,
        timeout: Duration,
        now: u64,
    ) -> Result<Lease, LeaseError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let path = dir.join(LEASE_FILE);
        let mut lease = Lease {
            dir: dir.to_path_buf(),
            path,
            owner,
            timeout,
            epoch: 1,
        };
        match lease.read()? {
            None => {
                // O_EXCL: of two coordinators starting at once, exactly one creates it.
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&lease.path);
                match created {
                    Ok(file) => {
                        drop(file);
                        lease.write(now)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(lease.held_by_current(now));
                    }
                    Err(e) => return Err(io("create", &lease.path)(e)),
                }
            }
            Some(record) => {
                let age = now.saturating_sub(record.renewed_unix_ms);
                let fresh = age < record.timeout_ms.max(timeout.as_millis() as u64);
                let dead = owner_is_gone(&record.owner, &lease.owner.host);
                if fresh && !dead {
                    return Err(lease.held(&record, now));
                }
                let why = if dead {
                    "its coordinator is no longer running on this host".to_string()
                } else {
                    format!("not renewed for {}s", age / 1000)
                };
                tracing::warn!(
                    "taking over the lease on {} from {} ({why})",
                    dir.display(),
                    record.owner,
                );
                lease.epoch = record.epoch + 1;
                lease.write(now)?;
            }
        }
        // Two takers of one expired lease both rename; the last rename wins. Whoever reads back
        // someone else's record lost the race.
        match lease.read()? {
            Some(r) if r.owner.id == lease.owner.id => Ok(lease),
            Some(r) => Err(lease.held(&r, now)),
            None => Err(LeaseError::Io {
                action: "read back",
                path: lease.path.clone(),
                source: std::io::Error::other("the lease vanished after it was written"),
            }),
        }
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How often to renew: a quarter of the timeout, so three renewals may fail (a slow shared
    /// filesystem) before anyone could take the lease over.
    pub fn renew_every(&self) -> Duration {
        self.timeout / 4
    }

    /// Errors with [`LeaseError::Lost`] when someone else holds the lease now.
    pub fn check(&self) -> Result<(), LeaseError> {
        match self.read()? {
            Some(r) if r.owner.id == self.owner.id => Ok(()),
            Some(r) => Err(LeaseError::Lost {
                dir: self.dir.clone(),
                by: Some(Box::new(r.owner)),
            }),
            None => Err(LeaseError::Lost {
                dir: self.dir.clone(),
                by: None,
            }),
        }
    }

    /// Renews the lease if it is still ours.
    pub fn renew(&self) -> Result<(), LeaseError> {
        self.check()?;
        self.write(now_unix_ms())
    }

    /// Gives the directory up (only if the lease is still ours).
    pub fn release(&self) {
        if self.check().is_ok() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn read(&self) -> Result<Option<Record>, LeaseError> {
        match std::fs::read_to_string(&self.path) {
            // Created by O_EXCL a moment ago, not yet written: a lease being taken right now.
            Ok(text) if text.is_empty() => Ok(Some(Record {
                owner: Owner {
                    id: String::new(),
                    job: "(a coordinator starting right now)".into(),
                    host: "-".into(),
                    pid: 0,
                    started_unix_ms: now_unix_ms(),
                },
                epoch: 0,
                renewed_unix_ms: now_unix_ms(),
                timeout_ms: self.timeout.as_millis() as u64,
            })),
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| LeaseError::Unreadable {
                    path: self.path.clone(),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &self.path)(e)),
        }
    }

    fn write(&self, now: u64) -> Result<(), LeaseError> {
        let record = Record {
            owner: self.owner.clone(),
            epoch: self.epoch,
            renewed_unix_ms: now,
            timeout_ms: self.timeout.as_millis() as u64,
        };
        let tmp = self
            .dir
            .join(format!("{LEASE_FILE}.{}.tmp", std::process::id()));
        let text = serde_json::to_vec_pretty(&record).expect("lease record serialises");
        std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))
    }

    fn held(&self, record: &Record, now: u64) -> LeaseError {
        let age = Duration::from_millis(now.saturating_sub(record.renewed_unix_ms));
        let timeout = Duration::from_millis(record.timeout_ms).max(self.timeout);
        LeaseError::Held {
            dir: self.dir.clone(),
            owner: Box::new(record.owner.clone()),
            renewed_ago: age,
            expires_in: timeout.saturating_sub(age),
        }
    }

    fn held_by_current(&self, now: u64) -> LeaseError {
        match self.read() {
            Ok(Some(r)) => self.held(&r, now),
            Ok(None) | Err(_) => LeaseError::Io {
                action: "create",
                path: self.path.clone(),
                source: std::io::Error::other("another coordinator is creating it"),
            },
        }
    }
}

/// A launch refused after taking the lease (bad data, a resume that cannot continue) and a job
/// that ended both give the directory up.
impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LeaseError + 'a {
    move |source| LeaseError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(name: &str, started: u64) -> Owner {
        Owner {
            id: format!("{name}:{started}"),
            job: format!("job-{name}"),
            host: format!("host-{name}"),
            pid: 42,
            started_unix_ms: started,
        }
    }

    #[test]
    fn one_owner_at_a_time_and_an_expired_lease_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let timeout = Duration::from_secs(30);
        let t0 = now_unix_ms();
        let first = Lease::acquire_as(&dir, owner("a", t0), timeout, t0).unwrap();
        assert_eq!(first.epoch(), 1);

        // Fresh: refused, naming the owner.
        let err = Lease::acquire_as(&dir, owner("b", t0 + 1000), timeout, t0 + 1000).unwrap_err();
        match &err {
            LeaseError::Held {
                owner, expires_in, ..
            } => {
                assert_eq!(owner.job, "job-a");
                assert!(*expires_in <= timeout && *expires_in >= Duration::from_secs(28));
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("host-a"), "{err}");
        first.check().unwrap();

        // Not renewed for the timeout: taken over, with the next epoch.
        let later = t0 + 31_000;
        let second = Lease::acquire_as(&dir, owner("b", later), timeout, later).unwrap();
        assert_eq!(second.epoch(), 2);
        // The old owner finds out at its next renewal or commit, and cannot take it back.
        match first.renew().unwrap_err() {
            LeaseError::Lost { by, .. } => assert_eq!(by.unwrap().job, "job-b"),
            other => panic!("{other}"),
        }
        first.release();
        second
            .check()
            .expect("a loser's release leaves the lease alone");
        second.release();
        assert!(!dir.join(LEASE_FILE).exists());
        // Released: the next launch takes it at once.
        Lease::acquire_as(&dir, owner("c", later), timeout, later).unwrap();
    }

    #[test]
    fn a_replaced_coordinator_waits_out_its_predecessors_lease_but_not_a_live_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let timeout = Duration::from_secs(2);
        // The predecessor: the same job from another host (a pod that died), never renewed.
        let mut gone = owner("old-pod", now_unix_ms());
        gone.job = "tiny".into();
        let predecessor = Lease::acquire_as(&dir, gone, timeout, now_unix_ms()).unwrap();
        std::mem::forget(predecessor); // it died: no release
        let mut told = false;
        let started = std::time::Instant::now();
        let lease = Lease::acquire_or_wait(&dir, "tiny", timeout, |_| told = true).unwrap();
        assert!(told && started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(lease.epoch(), 2);
        lease.release();

        // A live holder renews while watched: refused. (Its lease lasts 10 s, so that only a
        // renewal stalled that long, not a busy machine, could make it look dead.)
        let mut live = owner("live-pod", now_unix_ms());
        live.job = "tiny".into();
        let lease = Lease::acquire_as(&dir, live, Duration::from_secs(10), now_unix_ms()).unwrap();
        let renewer = std::thread::spawn({
            move || {
                for _ in 0..8 {
                    std::thread::sleep(Duration::from_millis(250));
                    lease.renew().unwrap();
                }
                lease
            }
        });
        let err = Lease::acquire_or_wait(&dir, "tiny", timeout, |_| ()).unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
        // Another job's lease is refused at once, as by acquire.
        let started = std::time::Instant::now();
        let err = Lease::acquire_or_wait(&dir, "other", timeout, |_| panic!("waited")).unwrap_err();
        assert!(
            matches!(err, LeaseError::Held { .. }) && started.elapsed() < Duration::from_secs(1)
        );
        renewer.join().unwrap().release();
    }

    #[test]
    fn a_dead_owner_on_this_host_is_taken_over_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let now = now_unix_ms();
        let host = host_name();
        // A process that has exited: its pid names nothing (or, rarely, some non-coordinator).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let gone = Owner {
            pid: dead_pid,
            host: host.clone(),
            ..owner("dead", now)
        };
        let first = Lease::acquire_as(tmp.path(), gone, Duration::from_secs(30), now).unwrap();
        let taker = Owner {
            host: host.clone(),
            ..owner("next", now)
        };
        let second = Lease::acquire_as(tmp.path(), taker, Duration::from_secs(30), now + 10)
            .expect("a fresh lease whose owner is gone from this host");
        assert_eq!(second.epoch(), first.epoch() + 1);
        // The same owner record, alive (this test process is not named coordinator, so use a
        // host other than ours): refused while fresh.
        let elsewhere = Owner {
            host: "another-host".into(),
            ..owner("live", now)
        };
        second.release();
        let _held = Lease::acquire_as(tmp.path(), elsewhere, Duration::from_secs(30), now).unwrap();
        let err = Lease::acquire_as(tmp.path(), owner("late", now), Duration::from_secs(30), now)
            .unwrap_err();
        assert!(matches!(err, LeaseError::Held { .. }), "{err}");
    }

    #[test]
    fn a_garbled_lease_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(LEASE_FILE), "{not json").unwrap();
        let err = Lease::acquire(tmp.path(), "job", Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, LeaseError::Unreadable { .. }), "{err}");
        assert!(err.hint().contains("delete"), "{}", err.hint());
    }
}
