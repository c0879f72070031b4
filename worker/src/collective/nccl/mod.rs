//! NCCL collectives on the device memory libtorch owns (one GPU per worker).
//!
//! Every pointer handed from tch to cudarc passes through this module. cudarc is used at its
//! `result`/`sys` level: libtorch's device addresses go to NCCL as raw pointers, so nothing
//! cudarc holds owns, or could free, libtorch's memory.
//!
//! **Streams.** NCCL kernels are enqueued on libtorch's *current* stream of the device, found at
//! run time through `aoti_torch_get_current_cuda_stream` (only a CUDA libtorch exports it: a
//! link-time reference would break the CPU build). On that stream they run after the backward
//! kernels that wrote the gradients and before the kernels that read them, with no host
//! synchronisation. When the symbol is missing, the legacy default stream (NULL), which is
//! libtorch's default stream, is used after a `tch::Cuda::synchronize`: the same order, at the
//! cost of a host wait.
//!
//! **Completion and failure.** The communicator is non-blocking (`blocking = 0`). After
//! enqueueing an operation the host waits for an event recorded behind it while polling
//! `ncclCommGetAsyncError`, the generation's abort flag (set when the coordinator says the
//! generation ended) and the collective timeout. An error, an abort or a timeout aborts the
//! communicator (`ncclCommAbort`) and returns an error: never a hang. NCCL documents that after
//! an error nothing can be assumed about completion, so the communicator is not used again.

mod ffi;
mod ops;

use super::{Collective, CollectiveError, ReduceOp};
use cudarc::driver::{result as cu, sys as cusys, CudaContext};
use cudarc::nccl::{result as nc, sys as ncsys};
pub use ffi::{check_library, data_type, unique_id, UNIQUE_ID_BYTES};
use ffi::{current_stream, describe, nccl_error, nonblocking_config, NO_DRIVER};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// How long a healthy communicator may take to finalise before it is aborted instead.
const FINALIZE_LIMIT: Duration = Duration::from_secs(10);

pub struct NcclOptions {
    /// How long one operation (or creating the communicator) may take.
    pub timeout: Duration,
    /// Set from another thread when the generation ends: the communicator is aborted.
    pub abort: Arc<AtomicBool>,
}

/// One rank's NCCL communicator on its GPU.
pub struct Nccl {
    comm: ncsys::ncclComm_t,
    rank: usize,
    world_size: usize,
    device: Device,
    /// Keeps the primary context (the one libtorch uses) retained while the communicator lives.
    ctx: Arc<CudaContext>,
    stream: ncsys::cudaStream_t,
    /// No current-stream lookup: synchronise the device before enqueueing on the NULL stream.
    synchronize_first: bool,
    /// Recorded behind each operation; its completion is what the host waits for.
    event: cusys::CUevent,
    timeout: Duration,
    abort: Arc<AtomicBool>,
    /// Packing area for tensors that are not one region, reused between steps.
    pack: Option<Tensor>,
    /// Aborted (after an error, a timeout or the generation's end): never used again.
    broken: bool,
}

// SAFETY: the communicator, stream and event are plain handles that NCCL and CUDA allow any
// thread to use; `&mut self` on every operation keeps them to one thread at a time.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Builds this rank's communicator from rank 0's unique id, on `device` (the GPU libtorch
    /// uses for this worker).
    pub fn connect(
        unique_id: &[u8],
        rank: usize,
        world_size: usize,
        device: Device,
        options: NcclOptions,
    ) -> Result<Nccl, CollectiveError> {
        const DURING: &str = "creating the communicator";
        let Device::Cuda(ordinal) = device else {
            return Err(nccl_error(
                DURING,
                format!("needs a CUDA device, got {device:?}"),
            ));
        };
        // SAFETY: only tries to dlopen the names cudarc would load.
        if !unsafe { cusys::is_culib_present() } {
            return Err(nccl_error(DURING, NO_DRIVER));
        }
        check_library().map_err(|m| nccl_error(DURING, m))?;
        let bytes: [u8; UNIQUE_ID_BYTES] = unique_id.try_into().map_err(|_| {
            nccl_error(
                DURING,
                format!(
                    "the unique id has {} bytes, not {UNIQUE_ID_BYTES}",
                    unique_id.len()
                ),
            )
        })?;
        let driver = |e: cu::DriverError| nccl_error(DURING, format!("CUDA driver: {e:?}"));
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        // NCCL creates the communicator on the thread's current device.
        ctx.bind_to_thread().map_err(driver)?;
        let id = ncsys::ncclUniqueId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        };
        let event =
            cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(driver)?;
        let (stream, synchronize_first) = match current_stream(ordinal) {
            Some(s) => (s, false),
            None => (std::ptr::null_mut(), true),
        };
        let mut comm: ncsys::ncclComm_t = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: `comm` and `config` are valid for the call; NCCL copies the id and config.
        let started = unsafe {
            nc::comm_init_rank_config(&mut comm, world_size as i32, id, rank as i32, &mut config)
        };
        let mut nccl = Nccl {
            comm,
            rank,
            world_size,
            device,
            ctx,
            stream,
            synchronize_first,
            event,
            timeout: options.timeout,
            abort: options.abort,
            pack: None,
            broken: false,
        };
        if let Err(e) = started {
            nccl.break_comm();
            return Err(nccl_error(DURING, describe(e.0)));
        }
        nccl.settle(DURING, Instant::now())?;
        tracing::info!(
            rank,
            world_size,
            device = ?device,
            stream = if synchronize_first { "NULL after a device sync" } else { "libtorch's current" },
            "NCCL communicator ready"
        );
        Ok(nccl)
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        self.all_reduce_with_scalars(tensors, &mut [], op)
    }

    fn reduce_scatter(
        &mut self,
        input: &mut Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        Nccl::reduce_scatter(self, input, output, op)
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<(), CollectiveError> {
        Nccl::all_gather(self, input, output)
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        Nccl::broadcast(self, tensor, root)
    }

    fn all_reduce_scalars(
        &mut self,
        values: &mut [f64],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        self.all_reduce_with_scalars(&mut [], values, op)
    }

    /// The gradients and the step's scalars in one NCCL group: one launch, one wait.
    fn all_reduce_with_scalars(
        &mut self,
        tensors: &mut [Tensor],
        scalars: &mut [f64],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        const DURING: &str = "all-reduce";
        self.begin(DURING)?;
        let since = Instant::now();
        // The scalars travel in a small f64 tensor on the GPU (the copy in is ordered on the
        // same stream; the copy out happens after the wait).
        let on_device =
            (!scalars.is_empty()).then(|| Tensor::from_slice(scalars).to_device(self.device));
        nc::group_start().map_err(|e| nccl_error(DURING, describe(e.0)))?;
        let enqueued = self.enqueue_tensors(tensors, op, DURING).and_then(|pack| {
            if let Some(s) = &on_device {
                let dtype = ncsys::ncclDataType_t::ncclFloat64;
                self.enqueue_all_reduce(s.data_ptr() as usize, s.numel(), dtype, op, DURING)?;
            }
            Ok(pack)
        });
        // The group is closed whatever happened inside it.
        let ended = nc::group_end();
        let pack = enqueued?;
        self.finish_call(ended, DURING, since)?;
        if let Some((pack, _)) = pack {
            self.unpack(pack, tensors);
        }
        if let Some(s) = on_device {
            let reduced: Vec<f64> = Vec::try_from(&s)
                .map_err(|e| nccl_error(DURING, format!("reading the reduced scalars: {e}")))?;
            scalars.copy_from_slice(&reduced);
        }
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.broken && !self.comm.is_null() {
            // A healthy communicator is finalised (flushing what is in flight) and destroyed;
            // one that does not finalise in time is aborted.
            let _ = self.ctx.bind_to_thread();
            // SAFETY: a live communicator, not used after this.
            let finalized = unsafe { nc::comm_finalize(self.comm) };
            let clean = finalized.is_ok() && {
                let since = Instant::now();
                let mut state = ncsys::ncclResult_t::ncclInProgress;
                while state == ncsys::ncclResult_t::ncclInProgress
                    && since.elapsed() < FINALIZE_LIMIT
                {
                    // SAFETY: as above.
                    unsafe { ncsys::ncclCommGetAsyncError(self.comm, &mut state) };
                    std::thread::sleep(Duration::from_micros(100));
                }
                state == ncsys::ncclResult_t::ncclSuccess
            };
            if clean {
                // SAFETY: finalised; destroy frees it and it is not used again.
                unsafe {
                    let _ = nc::comm_destroy(self.comm);
                }
            } else {
                self.break_comm();
            }
        }
        // SAFETY: the event was created by `connect` and nothing waits on it any more.
        unsafe {
            let _ = cu::event::destroy(self.event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_connect_fails_with_what_is_missing_and_never_panics() {
        let options = || NcclOptions {
            timeout: Duration::from_secs(1),
            abort: Arc::new(AtomicBool::new(false)),
        };
        let e = Nccl::connect(&[0; UNIQUE_ID_BYTES], 0, 1, Device::Cpu, options())
            .err()
            .expect("a CPU device is refused");
        assert!(e.to_string().contains("needs a CUDA device"), "{e}");
        // SAFETY: only probes for the library.
        if unsafe { cusys::is_culib_present() } && check_library().is_ok() {
            eprintln!("skipped: this host has a CUDA driver and NCCL (the GPU tests cover it)");
            return;
        }
        let e = Nccl::connect(&[0; UNIQUE_ID_BYTES], 0, 1, Device::Cuda(0), options())
            .err()
            .expect("no driver or no NCCL here");
        let text = e.to_string();
        assert!(
            text.contains("libcuda.so") || text.contains("libnccl.so"),
            "{text}"
        );
        if check_library().is_err() {
            let e = unique_id().expect_err("no NCCL here");
            assert!(e.to_string().contains("setup-libtorch.sh --cuda"), "{e}");
        }
    }
}
