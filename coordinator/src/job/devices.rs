//! What a complete group trains on and how it reduces gradients: `cluster.device` and
//! `cluster.collective` resolved against what every worker reported at registration. A group
//! that cannot do what the config asks is refused with the workers' own reasons, before any of
//! them loads a model.

use super::events::WorkerInfo;
use crate::config::{CollectiveSetting, DeviceConfig, DeviceSetting};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Ring,
    Nccl,
}

/// What a worker can train on, as it reported at registration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkerDevices {
    /// CUDA devices the worker's libtorch sees.
    pub cuda_devices: u32,
    /// Why it cannot use CUDA (no driver, no GPU, a CPU-only libtorch); None: it can.
    pub cuda_unavailable: Option<String>,
    /// Why it cannot use NCCL; None: it can.
    pub nccl_unavailable: Option<String>,
    /// The NCCL unique id this worker offers, used when it becomes rank 0.
    pub nccl_id: Option<Vec<u8>>,
    /// Memory of its smallest CUDA device, when it reported one.
    pub gpu_memory: Option<u64>,
}

/// What each GPU must hold for this job (`coordinator plan`'s estimate) and the estimate's
/// biggest term, for the refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuNeed {
    pub bytes: u64,
    pub biggest: String,
}

/// [`resolve`], then [`check_memory`] against the job's estimate.
pub fn resolve_fitting(
    params: &super::JobParams,
    ordered: &[&WorkerInfo],
) -> Result<Resolved, String> {
    let resolved = resolve(params.devices, ordered)?;
    check_memory(&resolved, params.gpu_need.as_ref(), ordered)?;
    Ok(resolved)
}

/// Err when the group trains on CUDA and a worker's GPU has less memory than the estimate.
pub fn check_memory(
    resolved: &Resolved,
    need: Option<&GpuNeed>,
    ordered: &[&WorkerInfo],
) -> Result<(), String> {
    let (DeviceKind::Cuda, Some(need)) = (resolved.device, need) else {
        return Ok(());
    };
    let short: Vec<(&WorkerInfo, String)> = ordered
        .iter()
        .filter_map(|w| {
            let have = w.devices.gpu_memory?;
            (have < need.bytes).then(|| (*w, format!("{} MiB", have >> 20)))
        })
        .collect();
    if short.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the job does not fit on the workers' GPUs: each needs about {} MiB (the biggest term is {}), but {} of {} workers have less: {}. `coordinator plan --device-memory SIZE` lists every term; or start anyway with --ignore-fit",
        need.bytes >> 20,
        need.biggest,
        short.len(),
        ordered.len(),
        list(&short)
    ))
}

impl WorkerDevices {
    fn cuda_problem(&self) -> Option<String> {
        match (&self.cuda_unavailable, self.cuda_devices) {
            (Some(why), _) => Some(why.clone()),
            (None, 0) => Some("it reported no CUDA device".into()),
            (None, _) => None,
        }
    }
}

/// The group's device, collective and (with NCCL) the unique id every rank builds from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub device: DeviceKind,
    pub backend: Backend,
    pub nccl_id: Option<Vec<u8>>,
}

/// At most this many workers are named in a refusal; the count says how many more.
const NAMED: usize = 3;

fn who(w: &WorkerInfo) -> String {
    format!("worker {} on {}", w.worker_id, w.host)
}

/// Workers grouped by reason, each group "worker a on h1, worker b on h2 and 3 more: why";
/// groups separated by "; ".
fn list(problems: &[(&WorkerInfo, String)]) -> String {
    let mut reasons: Vec<(&str, Vec<&WorkerInfo>)> = Vec::new();
    for (w, why) in problems {
        match reasons.iter_mut().find(|(r, _)| *r == why.as_str()) {
            Some((_, workers)) => workers.push(w),
            None => reasons.push((why.as_str(), vec![w])),
        }
    }
    reasons
        .iter()
        .map(|(why, workers)| {
            let mut named: Vec<String> = workers.iter().take(NAMED).map(|w| who(w)).collect();
            if workers.len() > NAMED {
                named.push(format!("{} more", workers.len() - NAMED));
            }
            format!("{}: {why}", named.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Resolves the settings for a complete group; `ordered` is the group by rank. Err: why the
/// group cannot run as configured, naming the workers and what they lack.
pub fn resolve(config: DeviceConfig, ordered: &[&WorkerInfo]) -> Result<Resolved, String> {
    let without_cuda: Vec<(&WorkerInfo, String)> = ordered
        .iter()
        .filter_map(|w| w.devices.cuda_problem().map(|why| (*w, why)))
        .collect();
    let device = match config.device {
        DeviceSetting::Cpu => DeviceKind::Cpu,
        DeviceSetting::Cuda if without_cuda.is_empty() => DeviceKind::Cuda,
        DeviceSetting::Cuda => {
            return Err(format!(
                "cluster.device is cuda, but {} of {} workers cannot use CUDA: {}. Fix those hosts, or set `device: cpu` (or auto) to train on the CPU",
                without_cuda.len(),
                ordered.len(),
                list(&without_cuda)
            ))
        }
        DeviceSetting::Auto if without_cuda.is_empty() => DeviceKind::Cuda,
        DeviceSetting::Auto if without_cuda.len() == ordered.len() => DeviceKind::Cpu,
        DeviceSetting::Auto => {
            return Err(format!(
                "cluster.device is auto, and {} of {} workers can use CUDA while {} cannot: {}. A group trains on one kind of device: fix those hosts, or set `device: cpu` to train on the CPU everywhere",
                ordered.len() - without_cuda.len(),
                ordered.len(),
                without_cuda.len(),
                list(&without_cuda)
            ))
        }
    };
    let backend = match (config.collective, device) {
        (CollectiveSetting::Ring, DeviceKind::Cpu) | (CollectiveSetting::Auto, DeviceKind::Cpu) => {
            Backend::Ring
        }
        (CollectiveSetting::Ring, DeviceKind::Cuda) => {
            return Err(
                "cluster.collective is ring, which reduces host memory, but the group trains on CUDA: use `collective: nccl` (or auto) on GPUs, or `device: cpu`".into(),
            )
        }
        (CollectiveSetting::Nccl, DeviceKind::Cpu) => {
            return Err(format!(
                "cluster.collective is nccl, which needs CUDA on every worker, but {} of {} workers cannot use CUDA: {}. Fix those hosts, or use `collective: ring` (or auto) on the CPU",
                without_cuda.len(),
                ordered.len(),
                list(&without_cuda)
            ))
        }
        (CollectiveSetting::Nccl, DeviceKind::Cuda) | (CollectiveSetting::Auto, DeviceKind::Cuda) => {
            Backend::Nccl
        }
    };
    let nccl_id = match backend {
        Backend::Ring => None,
        Backend::Nccl => {
            let without_nccl: Vec<(&WorkerInfo, String)> = ordered
                .iter()
                .filter_map(|w| w.devices.nccl_unavailable.clone().map(|why| (*w, why)))
                .collect();
            if !without_nccl.is_empty() {
                return Err(format!(
                    "the group trains on CUDA with NCCL, but {} of {} workers cannot load NCCL: {}",
                    without_nccl.len(),
                    ordered.len(),
                    list(&without_nccl)
                ));
            }
            let first = ordered.first().ok_or("an empty group")?;
            match &first.devices.nccl_id {
                Some(id) if id.len() == NCCL_ID_BYTES => Some(id.clone()),
                _ => {
                    return Err(format!(
                        "{} (rank 0) offered no valid NCCL unique id ({NCCL_ID_BYTES} bytes)",
                        who(first)
                    ))
                }
            }
        }
    };
    Ok(Resolved {
        device,
        backend,
        nccl_id,
    })
}

/// The size of `ncclUniqueId`.
pub const NCCL_ID_BYTES: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, host: &str, devices: WorkerDevices) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            host: host.into(),
            local_index: 0,
            peer_address: "127.0.0.1:1".into(),
            version: "v".into(),
            devices,
        }
    }

    fn cpu_only() -> WorkerDevices {
        WorkerDevices {
            cuda_unavailable: Some("no NVIDIA driver".into()),
            nccl_unavailable: Some("no CUDA".into()),
            ..WorkerDevices::default()
        }
    }

    fn gpu(id_byte: u8) -> WorkerDevices {
        WorkerDevices {
            cuda_devices: 8,
            nccl_id: Some(vec![id_byte; NCCL_ID_BYTES]),
            ..WorkerDevices::default()
        }
    }

    fn config(device: DeviceSetting, collective: CollectiveSetting) -> DeviceConfig {
        DeviceConfig {
            device,
            collective,
            gpus_per_node: None,
        }
    }

    const AUTO: DeviceConfig = DeviceConfig {
        device: DeviceSetting::Auto,
        collective: CollectiveSetting::Auto,
        gpus_per_node: None,
    };

    #[test]
    fn auto_trains_on_the_cpu_with_the_ring_when_no_worker_has_cuda() {
        let (a, b) = (worker("a", "h1", cpu_only()), worker("b", "h2", cpu_only()));
        let r = resolve(AUTO, &[&a, &b]).unwrap();
        assert_eq!(
            (r.device, r.backend, r.nccl_id),
            (DeviceKind::Cpu, Backend::Ring, None)
        );
    }

    #[test]
    fn auto_takes_cuda_and_nccl_with_rank_0s_unique_id() {
        let (a, b) = (worker("a", "h1", gpu(1)), worker("b", "h2", gpu(2)));
        let r = resolve(AUTO, &[&b, &a]).unwrap();
        assert_eq!((r.device, r.backend), (DeviceKind::Cuda, Backend::Nccl));
        // The first in rank order is rank 0: its id, not the other's.
        assert_eq!(r.nccl_id, Some(vec![2; NCCL_ID_BYTES]));
    }

    #[test]
    fn a_mixed_group_is_refused_naming_the_workers_without_cuda() {
        let (a, b) = (worker("a", "h1", gpu(1)), worker("b", "h2", cpu_only()));
        let e = resolve(AUTO, &[&a, &b]).unwrap_err();
        assert!(
            e.contains("1 of 2 workers can use CUDA while 1 cannot"),
            "{e}"
        );
        assert!(e.contains("worker b on h2: no NVIDIA driver"), "{e}");
        assert!(!e.contains("worker a"), "{e}");
    }

    #[test]
    fn explicit_cuda_or_nccl_without_cuda_gives_the_workers_reason() {
        let a = worker("a", "h1", cpu_only());
        let e = resolve(config(DeviceSetting::Cuda, CollectiveSetting::Auto), &[&a]).unwrap_err();
        assert!(
            e.contains("cluster.device is cuda") && e.contains("no NVIDIA driver"),
            "{e}"
        );
        let e = resolve(config(DeviceSetting::Auto, CollectiveSetting::Nccl), &[&a]).unwrap_err();
        assert!(
            e.contains("cluster.collective is nccl") && e.contains("no NVIDIA driver"),
            "{e}"
        );
    }

    #[test]
    fn cpu_is_used_when_asked_even_with_gpus_and_the_ring_is_refused_on_cuda() {
        let a = worker("a", "h1", gpu(1));
        let r = resolve(config(DeviceSetting::Cpu, CollectiveSetting::Auto), &[&a]).unwrap();
        assert_eq!((r.device, r.backend), (DeviceKind::Cpu, Backend::Ring));
        let e = resolve(config(DeviceSetting::Cuda, CollectiveSetting::Ring), &[&a]).unwrap_err();
        assert!(e.contains("collective is ring"), "{e}");
    }

    #[test]
    fn nccl_needs_the_library_everywhere_and_an_id_from_rank_0() {
        let mut no_lib = gpu(1);
        no_lib.nccl_unavailable = Some("libnccl.so not found".into());
        let (a, b) = (worker("a", "h1", gpu(1)), worker("b", "h2", no_lib));
        let e = resolve(AUTO, &[&a, &b]).unwrap_err();
        assert!(e.contains("worker b on h2: libnccl.so not found"), "{e}");

        let mut short_id = gpu(1);
        short_id.nccl_id = Some(vec![0; 7]);
        let c = worker("c", "h1", short_id);
        let e = resolve(AUTO, &[&c, &a]).unwrap_err();
        assert!(
            e.contains("worker c on h1 (rank 0) offered no valid NCCL unique id"),
            "{e}"
        );
    }

    #[test]
    fn long_lists_name_three_workers_per_reason_and_count_the_rest() {
        let mut workers: Vec<WorkerInfo> = (0..5)
            .map(|i| worker(&format!("w{i}"), "h", cpu_only()))
            .collect();
        let mut other = cpu_only();
        other.cuda_unavailable = Some("a CPU-only libtorch".into());
        workers.push(worker("x", "h9", other));
        let refs: Vec<&WorkerInfo> = workers.iter().collect();
        let e = resolve(config(DeviceSetting::Cuda, CollectiveSetting::Auto), &refs).unwrap_err();
        assert!(
            e.contains("6 of 6 workers cannot use CUDA: worker w0 on h, worker w1 on h, worker w2 on h, 2 more: no NVIDIA driver; worker x on h9: a CPU-only libtorch."),
            "{e}"
        );
    }

    #[test]
    fn a_gpu_smaller_than_the_estimate_is_refused_naming_the_biggest_term() {
        let with_memory = |id, gib: u64| WorkerDevices {
            gpu_memory: Some(gib << 30),
            ..gpu(id)
        };
        let (a, b) = (
            worker("a", "h1", with_memory(1, 80)),
            worker("b", "h2", with_memory(2, 24)),
        );
        let need = GpuNeed {
            bytes: 40 << 30,
            biggest: "optimizer state: 26000 MiB (AdamW)".into(),
        };
        let r = resolve(AUTO, &[&a, &b]).unwrap();
        let err = check_memory(&r, Some(&need), &[&a, &b]).unwrap_err();
        assert!(err.contains("each needs about 40960 MiB"), "{err}");
        assert!(err.contains("biggest term is optimizer state"), "{err}");
        assert!(
            err.contains("1 of 2 workers have less: worker b on h2: 24576 MiB"),
            "{err}"
        );
        assert!(check_memory(&r, Some(&need), &[&a]).is_ok());
        assert!(check_memory(&r, None, &[&a, &b]).is_ok());
        // On the CPU the GPUs do not matter.
        let cpu = resolve(
            config(DeviceSetting::Cpu, CollectiveSetting::Auto),
            &[&a, &b],
        )
        .unwrap();
        assert!(check_memory(&cpu, Some(&need), &[&a, &b]).is_ok());
    }
}
