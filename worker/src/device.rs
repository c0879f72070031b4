//! Device placement: the one place that knows which device this worker trains on.
//!
//! It reports what the worker has at registration (so the coordinator can resolve
//! `cluster.device: auto` and refuse a group that cannot run as configured, with this worker's
//! own reason), chooses the device of a generation (`cuda:<local_rank mod visible GPUs>`: under
//! `--gpus-per-task=1` or a Kubernetes GPU request each process sees exactly one), and gives the
//! host memory that checkpoint snapshots are copied into. Model, batches and optimizer state
//! follow the device chosen here (the loader, `data::batch` and `zeros_like`); nothing in
//! `model/` names a device.

use crate::collective::nccl;
use tch::{Device, Tensor};

/// One CUDA device as the worker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDevice {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
}

/// What this worker can train on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    pub cuda: Vec<CudaDevice>,
    /// Why CUDA cannot be used; None when `cuda` lists usable devices.
    pub cuda_unavailable: Option<String>,
    /// Why NCCL cannot be used; None when it can.
    pub nccl_unavailable: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the coordinator assigned device `{0}`, which this worker does not know (expected cpu or cuda)")]
    Unknown(String),
    #[error("the coordinator assigned CUDA, but this worker cannot use it: {0}")]
    NoCuda(String),
}

/// Whether libtorch's CUDA half (libtorch_cuda.so) is loaded: a CPU-only libtorch has none.
fn libtorch_cuda_loaded() -> bool {
    // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded (nothing is
    // loaded or initialised); a handle it returns is released at once.
    unsafe {
        let handle = libc::dlopen(
            c"libtorch_cuda.so".as_ptr(),
            libc::RTLD_NOLOAD | libc::RTLD_LAZY,
        );
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
        true
    }
}

/// The driver's view: Ok(device count) or why there is no usable driver.
fn driver_devices() -> Result<usize, String> {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to dlopen the names cudarc would load; cudarc panics on a missing
    // library, so nothing else is called unless this succeeds.
    if !unsafe { sys::is_culib_present() } {
        return Err("no NVIDIA driver on this host (libcuda.so cannot be loaded)".into());
    }
    result::init().map_err(|e| format!("the NVIDIA driver did not initialise ({e:?})"))?;
    let count = result::device::get_count()
        .map_err(|e| format!("the NVIDIA driver cannot count GPUs ({e:?})"))?;
    if count <= 0 {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        return Err(format!(
            "the NVIDIA driver sees no GPU (CUDA_VISIBLE_DEVICES={visible})"
        ));
    }
    Ok(count as usize)
}

fn describe_cuda(index: usize) -> CudaDevice {
    use cudarc::driver::result::device;
    let (name, memory_bytes) = match device::get(index as i32) {
        Ok(d) => (
            device::get_name(d).unwrap_or_else(|_| "CUDA device".into()),
            // SAFETY: `d` is a device handle the driver just returned.
            unsafe { device::total_mem(d) }.unwrap_or(0) as u64,
        ),
        Err(_) => ("CUDA device".into(), 0),
    };
    CudaDevice {
        index,
        name,
        memory_bytes,
    }
}

/// What this worker has. Cheap: no CUDA context is created.
pub fn inventory() -> Inventory {
    let mut problems = Vec::new();
    let driver = driver_devices();
    if let Err(why) = &driver {
        problems.push(why.clone());
    }
    let libtorch_cuda = libtorch_cuda_loaded();
    if !libtorch_cuda {
        problems.push(
            "this worker is built against a CPU-only libtorch (build it with `make build-cuda`, see README \"GPU hosts\")".into(),
        );
    }
    if problems.is_empty() && !tch::Cuda::is_available() {
        problems.push(
            "libtorch cannot use the GPUs the driver reports (a driver older than the CUDA 13 libtorch needs?)".into(),
        );
    }
    if !problems.is_empty() {
        return Inventory {
            cuda: Vec::new(),
            cuda_unavailable: Some(problems.join("; ")),
            nccl_unavailable: Some("no usable CUDA".into()),
        };
    }
    let count = tch::Cuda::device_count().max(0) as usize;
    Inventory {
        cuda: (0..count).map(describe_cuda).collect(),
        cuda_unavailable: None,
        nccl_unavailable: nccl::check_library().err(),
    }
}

/// The device of this worker for a generation the coordinator resolved to `kind`.
pub fn choose(kind: &str, local_rank: usize) -> Result<Device, DeviceError> {
    match kind {
        // An older coordinator sends no device: the CPU.
        "cpu" | "" => Ok(Device::Cpu),
        "cuda" => {
            if let Some(why) = inventory().cuda_unavailable {
                return Err(DeviceError::NoCuda(why));
            }
            let count = tch::Cuda::device_count().max(1) as usize;
            Ok(Device::Cuda(local_rank % count))
        }
        other => Err(DeviceError::Unknown(other.to_string())),
    }
}

/// Host memory for a snapshot of `t`: pinned when `t` lives on a GPU, so the copy out of device
/// memory runs at full bus speed; the same layout and dtype.
pub fn host_buffer_like(t: &Tensor) -> Tensor {
    host_buffer(&t.size(), t.kind(), t.device())
}

/// Host memory of `size` for copies out of `device` (pinned for a GPU).
pub fn host_buffer(size: &[i64], kind: tch::Kind, device: Device) -> Tensor {
    let host = Tensor::empty(size, (kind, Device::Cpu));
    match device {
        Device::Cuda(i) => host.pin_memory(Device::Cuda(i)),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_chosen_for_cpu_and_unknown_kinds_are_refused() {
        assert_eq!(choose("cpu", 3).unwrap(), Device::Cpu);
        assert_eq!(choose("", 0).unwrap(), Device::Cpu);
        assert!(matches!(choose("tpu", 0), Err(DeviceError::Unknown(_))));
    }

    #[test]
    fn a_host_without_cuda_says_why_and_cuda_is_refused_with_that_reason() {
        let inv = inventory();
        if inv.cuda_unavailable.is_none() {
            eprintln!("skipped: this host can use CUDA ({:?})", inv.cuda);
            return;
        }
        let why = inv.cuda_unavailable.clone().unwrap();
        assert!(inv.cuda.is_empty());
        assert!(inv.nccl_unavailable.is_some());
        // This CPU build names its libtorch, whatever the driver situation.
        assert!(
            why.contains("CPU-only libtorch") || why.contains("driver"),
            "{why}"
        );
        match choose("cuda", 0) {
            Err(DeviceError::NoCuda(reason)) => assert_eq!(reason, why),
            other => panic!("expected NoCuda, got {other:?}"),
        }
    }

    #[test]
    fn snapshot_memory_is_a_separate_host_copy() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([3, 1]);
        let host = host_buffer_like(&t);
        assert_eq!(
            (host.size(), host.kind(), host.device()),
            (t.size(), t.kind(), Device::Cpu)
        );
        assert_ne!(host.data_ptr(), t.data_ptr());
    }
}
