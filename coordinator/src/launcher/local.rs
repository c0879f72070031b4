//! Workers as child processes of the coordinator on this host.

use super::children::Children;
use super::{BoxFuture, LaunchError, LaunchPlan, Launcher, LauncherEvent};
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::mpsc;

/// Local workers are `local-0`, `local-1`, ...: the slot index is in the name.
const WORKER_ID_PREFIX: &str = "local-";

#[derive(Default)]
pub struct LocalLauncher {
    children: Children,
}

impl LocalLauncher {
    pub fn new() -> Self {
        Self::default()
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl LocalLauncher {
    /// Starts the worker of slot `index` (its log is continued when `append`).
    fn start(
        &mut self,
        plan: &LaunchPlan,
        index: u32,
        append: bool,
        events: &mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        let worker_id = format!("{WORKER_ID_PREFIX}{index}");
        let mut cmd = Command::new(&plan.worker_binary);
        cmd.arg("run")
            .arg("--coordinator")
            .arg(&plan.coordinator_url)
            .arg("--worker-id")
            .arg(&worker_id)
            .arg("--host")
            .arg(hostname())
            .arg("--local-index")
            .arg(index.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .env(ferrotune_proto::TOKEN_ENV, &plan.token);
        let log = plan.log_dir.join(format!("worker-{index}.log"));
        self.children
            .spawn(cmd, &plan.worker_binary, worker_id, log, append, events)
    }
}

impl Launcher for LocalLauncher {
    fn spawn(
        &mut self,
        plan: &LaunchPlan,
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        plan.create_log_dir()?;
        for index in 0..plan.world_size {
            self.start(plan, index, false, &events)?;
        }
        Ok(())
    }

    fn replace(
        &mut self,
        plan: &LaunchPlan,
        worker_ids: &[String],
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        for id in worker_ids {
            let Some(index) = id
                .strip_prefix(WORKER_ID_PREFIX)
                .and_then(|i| i.parse::<u32>().ok())
            else {
                tracing::warn!(worker_id = %id, "not a worker this launcher started; not replaced");
                continue;
            };
            self.children.retire(id);
            self.start(plan, index, true, &events)?;
        }
        Ok(())
    }

    fn stop_all(&mut self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.children.stop_all(grace).await;
        })
    }
}
