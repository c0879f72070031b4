//! Workers as child processes of the coordinator on this host.
//!
//! No orphans: every worker gets its own process group (so a terminal's Ctrl-C reaches only the
//! coordinator, which then stops workers in order) and the parent-death signal SIGKILL (so even a
//! coordinator killed with SIGKILL takes its workers with it). `kill_on_drop` covers the rest.

use super::{BoxFuture, LaunchError, LaunchPlan, Launcher, LauncherEvent};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

struct Running {
    pid: u32,
    exited: watch::Receiver<bool>,
}

#[derive(Default)]
pub struct LocalLauncher {
    workers: Vec<Running>,
}

impl LocalLauncher {
    pub fn new() -> Self {
        Self::default()
    }
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl Launcher for LocalLauncher {
    fn spawn(
        &mut self,
        plan: &LaunchPlan,
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        std::fs::create_dir_all(&plan.log_dir).map_err(|source| LaunchError::LogDir {
            dir: plan.log_dir.clone(),
            source,
        })?;
        let host = hostname();
        for index in 0..plan.world_size {
            let worker_id = format!("local-{index}");
            let mut cmd = Command::new(&plan.worker_binary);
            cmd.arg("run")
                .arg("--coordinator")
                .arg(&plan.coordinator_url)
                .arg("--worker-id")
                .arg(&worker_id)
                .arg("--host")
                .arg(&host)
                .arg("--local-index")
                .arg(index.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .env(ferrotune_proto::TOKEN_ENV, &plan.token)
                .stdin(Stdio::null())
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
                binary: plan.worker_binary.clone(),
                source,
            })?;
            let pid = child.id().unwrap_or(0);
            tracing::debug!(%worker_id, pid, "started worker");

            let log_path = plan.log_dir.join(format!("worker-{index}.log"));
            let log = std::fs::File::create(&log_path)
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
            tokio::spawn(async move {
                let status = child.wait().await;
                for r in readers {
                    let _ = r.await;
                }
                let (success, status) = match status {
                    Ok(s) => (s.success(), describe(&s)),
                    Err(e) => (false, format!("could not be waited for: {e}")),
                };
                let last_line = last_line.lock().ok().and_then(|l| l.clone());
                let _ = exited_tx.send(true);
                let _ = events.send(LauncherEvent::Exited {
                    worker_id,
                    success,
                    status,
                    last_line,
                });
            });
            self.workers.push(Running {
                pid,
                exited: exited_rx,
            });
        }
        Ok(())
    }

    fn stop_all(&mut self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            signal_running(&self.workers, libc::SIGTERM);
            let all_exited = async {
                for w in &mut self.workers {
                    let _ = w.exited.wait_for(|e| *e).await;
                }
            };
            if tokio::time::timeout(grace, all_exited).await.is_err() {
                tracing::warn!("workers still running {grace:?} after SIGTERM; sending SIGKILL");
                signal_running(&self.workers, libc::SIGKILL);
                for w in &mut self.workers {
                    let _ = w.exited.wait_for(|e| *e).await;
                }
            }
        })
    }
}

fn signal_running(workers: &[Running], signal: i32) {
    for w in workers {
        if !*w.exited.borrow() && w.pid != 0 {
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet (its waiter has not
            // flagged it exited), so the pid still names our child or its zombie.
            unsafe {
                libc::kill(w.pid as i32, signal);
            }
        }
    }
}

/// Copies a worker's output into its log file, remembering the last non-empty line.
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
