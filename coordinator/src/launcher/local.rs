//! Workers as child processes of the coordinator on this host.

use super::children::Children;
use super::{BoxFuture, LaunchError, LaunchPlan, Launcher, LauncherEvent};
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::mpsc;

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

impl Launcher for LocalLauncher {
    fn spawn(
        &mut self,
        plan: &LaunchPlan,
        events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        plan.create_log_dir()?;
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
                .env(ferrotune_proto::TOKEN_ENV, &plan.token);
            let log = plan.log_dir.join(format!("worker-{index}.log"));
            self.children
                .spawn(cmd, &plan.worker_binary, worker_id, log, &events)?;
        }
        Ok(())
    }

    fn stop_all(&mut self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.children.stop_all(grace).await;
        })
    }
}
