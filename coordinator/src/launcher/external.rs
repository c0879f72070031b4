//! `launcher: external`: someone else starts the workers (a Kubernetes Indexed Job, a script on
//! each host, a scheduler ferrotune does not know). The coordinator starts nothing, owns no
//! process, and learns about workers only through the gRPC API: registration, heartbeats and
//! Finish reports. Workers it cannot stop are told to abort in their heartbeat answers.

use super::{BoxFuture, LaunchError, LaunchPlan, Launcher, LauncherEvent};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Default)]
pub struct ExternalLauncher;

impl Launcher for ExternalLauncher {
    fn spawn(
        &mut self,
        plan: &LaunchPlan,
        _events: mpsc::UnboundedSender<LauncherEvent>,
    ) -> Result<(), LaunchError> {
        tracing::info!(
            "waiting for {} workers started elsewhere to register at {}",
            plan.world_size,
            plan.coordinator_url
        );
        Ok(())
    }

    fn stop_all(&mut self, _grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn tracks_exits(&self) -> bool {
        false
    }
}
