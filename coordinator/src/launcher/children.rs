//! Processes the coordinator starts itself (workers, or `srun` steps that run them): output into
//! a log file with the last line kept, an exit event per process, and a stop that returns only
//! once every process is gone.
//!
//! No orphans: every child gets its own process group (so a terminal's Ctrl-C reaches only the
//! coordinator, which then stops children in order) and the parent-death signal SIGKILL (so even
//! a coordinator killed with SIGKILL takes them with it). `kill_on_drop` covers the rest.

use super::{LaunchError, LauncherEvent};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

struct Running {
    worker_id: String,
    /// Set when the process is replaced by a new instance: its exit is then expected and not
    /// reported (the job already counted the failure that replaced it).
    retired: Arc<std::sync::atomic::AtomicBool>,
    pid: u32,
    /// A pidfd names this very process even after it has been reaped, where a pid could name
    /// a stranger that reused it; None on kernels without pidfd_open (before 5.3).
    pidfd: Option<OwnedFd>,
    exited: watch::Receiver<bool>,
}

#[derive(Default)]
pub struct Children {
    running: Vec<Running>,
}

impl Children {
    /// Starts `cmd` as `worker_id`, its stdout and stderr written to `log_path` (appended when
    /// `append`: a replacement continues its slot's log); its exit is reported on `events`.
    pub fn spawn(
        &mut self,
        mut cmd: Command,
        program: &Path,
        worker_id: String,
        log_path: PathBuf,
        append: bool,
        events: &mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (setpgid, prctl, getppid, _exit) on no shared state.
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The parent may have died between fork and prctl: then nobody will reap us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            binary: program.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let pidfd = open_pidfd(pid);
        tracing::debug!(%worker_id, pid, "started");

        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&log_path)
            .ok()
            .map(tokio::fs::File::from_std);
        let log = Arc::new(tokio::sync::Mutex::new(log));
        let last_line = Arc::new(Mutex::new(None::<String>));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(
                out,
                log.clone(),
                last_line.clone(),
                worker_id.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(
                err,
                log.clone(),
                last_line.clone(),
                worker_id.clone(),
            )));
        }
        let (exited_tx, exited_rx) = watch::channel(false);
        let events = events.clone();
        let retired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_retired = retired.clone();
        let id = worker_id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            for r in readers {
                let _ = r.await;
            }
            let (success, code, status) = match status {
                Ok(s) => (s.success(), s.code(), describe(&s)),
                Err(e) => (false, None, format!("could not be waited for: {e}")),
            };
            let last_line = last_line.lock().ok().and_then(|l| l.clone());
            let _ = exited_tx.send(true);
            if is_retired.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::debug!(worker_id = %id, "replaced instance ended: {status}");
                return;
            }
            let _ = events.send(LauncherEvent::Exited {
                worker_id: id,
                success,
                code,
                status,
                last_line,
            });
        });
        self.running.retain(|r| !*r.exited.borrow());
        self.running.push(Running {
            worker_id,
            retired,
            pid,
            pidfd,
            exited: exited_rx,
        });
        Ok(())
    }

    /// Makes room for a new instance of `worker_id`: the current one (if still running: frozen,
    /// partitioned) is killed, and its exit is not reported.
    pub fn retire(&mut self, worker_id: &str) {
        for w in self.running.iter().filter(|w| w.worker_id == worker_id) {
            w.retired.store(true, std::sync::atomic::Ordering::SeqCst);
            if !*w.exited.borrow() {
                w.signal(libc::SIGKILL);
            }
        }
    }

    /// SIGTERM to every child still running, SIGKILL to those left after `grace`; returns once
    /// all are gone. Returns whether SIGKILL was needed.
    pub async fn stop_all(&mut self, grace: Duration) -> bool {
        self.signal(libc::SIGTERM);
        let all_exited = async {
            for w in &mut self.running {
                let _ = w.exited.wait_for(|e| *e).await;
            }
        };
        if tokio::time::timeout(grace, all_exited).await.is_ok() {
            return false;
        }
        tracing::warn!("processes still running {grace:?} after SIGTERM; sending SIGKILL");
        self.signal(libc::SIGKILL);
        for w in &mut self.running {
            let _ = w.exited.wait_for(|e| *e).await;
        }
        true
    }

    fn signal(&self, signal: i32) {
        for w in &self.running {
            if !*w.exited.borrow() {
                w.signal(signal);
            }
        }
    }
}

impl Running {
    fn signal(&self, signal: i32) {
        match &self.pidfd {
            Some(fd) => {
                let _ = pidfd_signal(fd, signal);
            }
            // Without pidfd a pid reaped by its waiter but not yet flagged exited could have
            // been reused: a window of microseconds, on kernels older than 5.3 only.
            // SAFETY: kill(2) has no memory-safety preconditions.
            None if self.pid != 0 => unsafe {
                libc::kill(self.pid as i32, signal);
            },
            None => {}
        }
    }
}

/// Signals the process behind `fd`; once it is gone (even reaped and its pid reused) this
/// fails with ESRCH and signals nobody.
fn pidfd_signal(fd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A pidfd for a child that has not been waited for yet (so its pid still names it).
fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    if pid == 0 {
        return None;
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGINT => " (SIGINT)",
            _ => "",
        };
        format!("was killed by signal {sig}{name}")
    } else {
        "ended for an unknown reason".into()
    }
}

/// Copies a child's output into its log file, remembering the last non-empty line.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    reader: R,
    log: Arc<tokio::sync::Mutex<Option<tokio::fs::File>>>,
    last_line: Arc<Mutex<Option<String>>>,
    worker_id: String,
) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = log.lock().await.as_mut() {
            let _ = file.write_all(line.as_bytes()).await;
            let _ = file.write_all(b"\n").await;
        }
        tracing::debug!(target: "worker", worker = %worker_id, "{line}");
        if !line.trim().is_empty() {
            if let Ok(mut l) = last_line.lock() {
                *l = Some(strip_ansi(&line));
            }
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_signals_its_process_and_nobody_once_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let Some(fd) = open_pidfd(child.id()) else {
            // Kernels before 5.3 have no pidfd; the kill(2) fallback is all there is.
            eprintln!("skipped: this kernel has no pidfd_open");
            let _ = child.kill();
            let _ = child.wait();
            return;
        };
        pidfd_signal(&fd, libc::SIGKILL).expect("the child is alive");
        let status = child.wait().unwrap();
        assert!(!status.success());
        // Reaped: whoever gets that pid next, the pidfd no longer reaches anyone.
        let err = pidfd_signal(&fd, libc::SIGTERM).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }
}
