//! `cluster.device`, `cluster.collective` and `cluster.gpus_per_node`: what the workers train on
//! and how they reduce gradients. `auto` is resolved by the job once every worker has said what
//! it has (a coordinator never links libtorch and may run on a host without a GPU).

use super::{Checks, Spanned};
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSetting {
    /// CUDA when every worker can use a GPU, the CPU when none can; a mixed group is refused.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveSetting {
    /// NCCL on CUDA, the TCP ring on the CPU.
    #[default]
    Auto,
    Ring,
    Nccl,
}

impl DeviceSetting {
    pub fn name(self) -> &'static str {
        match self {
            DeviceSetting::Auto => "auto",
            DeviceSetting::Cpu => "cpu",
            DeviceSetting::Cuda => "cuda",
        }
    }
}

impl CollectiveSetting {
    pub fn name(self) -> &'static str {
        match self {
            CollectiveSetting::Auto => "auto",
            CollectiveSetting::Ring => "ring",
            CollectiveSetting::Nccl => "nccl",
        }
    }
}

/// The validated device settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceConfig {
    pub device: DeviceSetting,
    pub collective: CollectiveSetting,
    /// GPUs per node: one worker per GPU (the local launcher's world size, Slurm's
    /// `--gpus-per-task=1`). None: not said.
    pub gpus_per_node: Option<u32>,
}

impl DeviceConfig {
    /// Whether the launcher should bind one GPU to each worker.
    pub fn binds_gpus(&self) -> bool {
        self.gpus_per_node.is_some() || self.device == DeviceSetting::Cuda
    }
}

impl Checks<'_> {
    pub(super) fn devices(
        &mut self,
        device: Option<&Spanned<DeviceSetting>>,
        collective: Option<&Spanned<CollectiveSetting>>,
        gpus_per_node: Option<&Spanned<u32>>,
    ) -> DeviceConfig {
        let config = DeviceConfig {
            device: device.map(|d| d.value).unwrap_or_default(),
            collective: collective.map(|c| c.value).unwrap_or_default(),
            gpus_per_node: gpus_per_node.map(|g| self.positive_u32(g, "cluster.gpus_per_node")),
        };
        if let Some(c) = collective {
            if c.value == CollectiveSetting::Nccl && config.device == DeviceSetting::Cpu {
                self.push(
                    c,
                    "cluster.collective",
                    "nccl reduces GPU memory, but cluster.device is cpu".into(),
                    "use `collective: ring` on the CPU, or `device: cuda` (or auto) on GPU hosts",
                );
            }
        }
        if let (Some(g), Some(d)) = (gpus_per_node, device) {
            if d.value == DeviceSetting::Cpu {
                self.push(
                    g,
                    "cluster.gpus_per_node",
                    "one worker per GPU was asked for, but cluster.device is cpu".into(),
                    "remove gpus_per_node for a CPU job, or set `device: cuda`",
                );
            }
        }
        config
    }
}
