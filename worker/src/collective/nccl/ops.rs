//! The operations of a live communicator: enqueueing, waiting and aborting.

use super::ffi::{data_type, describe, nccl_error, red_op};
use super::Nccl;
use crate::collective::{flat, CollectiveError, ReduceOp};
use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::{result as nc, sys as ncsys};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

impl Nccl {
    /// Aborts the communicator (once); later operations fail at once.
    pub(super) fn break_comm(&mut self) {
        if self.broken {
            return;
        }
        self.broken = true;
        if !self.comm.is_null() {
            // SAFETY: a communicator NCCL created; aborting is allowed at any time, from any
            // state, and frees it. It is never used again (`broken`).
            if let Err(e) = unsafe { nc::comm_abort(self.comm) } {
                tracing::warn!("ncclCommAbort: {}", describe(e.0));
            }
        }
    }

    fn check_usable(&self, during: &'static str) -> Result<(), CollectiveError> {
        if self.broken {
            return Err(nccl_error(during, "the communicator was aborted earlier"));
        }
        Ok(())
    }

    /// Why to stop waiting, if there is a reason: the abort flag, an asynchronous NCCL error,
    /// the timeout. `Ok(true)`: NCCL is still busy with the last call.
    pub(super) fn poll(
        &mut self,
        during: &'static str,
        since: Instant,
    ) -> Result<bool, CollectiveError> {
        if self.abort.load(Ordering::Acquire) {
            self.break_comm();
            return Err(nccl_error(during, "aborted: the generation ended"));
        }
        let mut state = ncsys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (not broken) and a valid out-pointer.
        let queried = unsafe { ncsys::ncclCommGetAsyncError(self.comm, &mut state) };
        let failed = match (queried, state) {
            (ncsys::ncclResult_t::ncclSuccess, ncsys::ncclResult_t::ncclSuccess) => None,
            (ncsys::ncclResult_t::ncclSuccess, ncsys::ncclResult_t::ncclInProgress) => {
                if since.elapsed() > self.timeout {
                    Some(format!("did not finish within {:?}", self.timeout))
                } else {
                    return Ok(true);
                }
            }
            (ncsys::ncclResult_t::ncclSuccess, error) => Some(describe(error)),
            (error, _) => Some(describe(error)),
        };
        if let Some(message) = failed {
            self.break_comm();
            return Err(nccl_error(during, message));
        }
        if since.elapsed() > self.timeout {
            self.break_comm();
            return Err(nccl_error(
                during,
                format!(
                    "did not finish within {:?} (cluster.collective_timeout_s): a peer is lost or stalled",
                    self.timeout
                ),
            ));
        }
        Ok(false)
    }

    /// Waits until NCCL has taken the last call (a non-blocking communicator may still be
    /// working on it: creating itself, or launching a grouped operation).
    pub(super) fn settle(
        &mut self,
        during: &'static str,
        since: Instant,
    ) -> Result<(), CollectiveError> {
        while self.poll(during, since)? {
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    /// Waits for everything enqueued so far on the stream to complete.
    pub(super) fn wait(
        &mut self,
        during: &'static str,
        since: Instant,
    ) -> Result<(), CollectiveError> {
        // SAFETY: a live event of the current context; the stream is libtorch's or NULL.
        unsafe { cu::event::record(self.event, self.stream.cast()) }
            .map_err(|e| nccl_error(during, format!("cuEventRecord: {e:?}")))?;
        let mut pause = Duration::from_micros(10);
        loop {
            // SAFETY: a live event, recorded above.
            match unsafe { cu::event::query(self.event) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                Err(e) => {
                    self.break_comm();
                    return Err(nccl_error(during, format!("CUDA: {e:?}")));
                }
            }
            self.poll(during, since)?;
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Common checks before enqueueing, and the device sync of the fallback mode.
    pub(super) fn begin(&mut self, during: &'static str) -> Result<(), CollectiveError> {
        self.check_usable(during)?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| nccl_error(during, format!("CUDA driver: {e:?}")))?;
        if self.synchronize_first {
            tch::Cuda::synchronize(self.ordinal() as i64);
        }
        Ok(())
    }

    fn ordinal(&self) -> usize {
        match self.device {
            Device::Cuda(i) => i,
            _ => 0,
        }
    }

    fn check_tensor(&self, t: &Tensor) -> Result<ncsys::ncclDataType_t, CollectiveError> {
        let unsupported = || CollectiveError::UnsupportedTensor {
            kind: t.kind(),
            device: t.device(),
            expected: "tensors on this worker's GPU (NCCL)",
        };
        if t.device() != self.device {
            return Err(unsupported());
        }
        data_type(t.kind()).ok_or_else(unsupported)
    }

    /// Enqueues an in-place all-reduce of `count` elements at `address`.
    pub(super) fn enqueue_all_reduce(
        &mut self,
        address: usize,
        count: usize,
        dtype: ncsys::ncclDataType_t,
        op: ReduceOp,
        during: &'static str,
    ) -> Result<(), CollectiveError> {
        if count == 0 {
            return Ok(());
        }
        let p = address as *mut std::ffi::c_void;
        // SAFETY: `address` is the start of `count` contiguous elements of `dtype` in device
        // memory of this communicator's GPU, owned by tensors the caller keeps alive (borrowed)
        // until `wait` has seen the operation complete.
        let r = unsafe { nc::all_reduce(p, p, count, dtype, red_op(op), self.comm, self.stream) };
        r.map(|_| ()).map_err(|e| {
            self.break_comm();
            nccl_error(during, describe(e.0))
        })
    }

    /// Enqueues the reduction of `tensors` in place: one call when they are one region (the
    /// flat gradient buffer), else through the reused packing area.
    pub(super) fn enqueue_tensors(
        &mut self,
        tensors: &mut [Tensor],
        op: ReduceOp,
        during: &'static str,
    ) -> Result<Option<(Tensor, Kind)>, CollectiveError> {
        let Some(first) = tensors.iter().find(|t| t.numel() > 0) else {
            return Ok(None);
        };
        let dtype = self.check_tensor(first)?;
        let kind = first.kind();
        for t in tensors.iter() {
            if t.kind() != kind {
                return Err(CollectiveError::UnsupportedTensor {
                    kind: t.kind(),
                    device: t.device(),
                    expected: "tensors of one dtype per call (NCCL)",
                });
            }
            self.check_tensor(t)?;
        }
        if let Some((address, count)) = flat::one_region(tensors) {
            self.enqueue_all_reduce(address, count, dtype, op, during)?;
            return Ok(None);
        }
        let total: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
        let pack = match self.pack.take() {
            Some(p) if p.numel() as i64 == total && p.kind() == kind => p,
            _ => Tensor::empty([total], (kind, self.device)),
        };
        let mut offset = 0;
        tch::no_grad(|| {
            for t in tensors.iter() {
                let n = t.numel() as i64;
                pack.narrow(0, offset, n).copy_(&t.reshape([-1]));
                offset += n;
            }
        });
        self.enqueue_all_reduce(pack.data_ptr() as usize, total as usize, dtype, op, during)?;
        Ok(Some((pack, kind)))
    }

    /// Copies the reduced packing area back into the tensors it was packed from.
    pub(super) fn unpack(&mut self, pack: Tensor, tensors: &mut [Tensor]) {
        let mut offset = 0;
        tch::no_grad(|| {
            for t in tensors.iter_mut() {
                let n = t.numel() as i64;
                let part = pack.narrow(0, offset, n).view(t.size().as_slice());
                t.copy_(&part);
                offset += n;
            }
        });
        self.pack = Some(pack);
    }

    /// `output[i] = reduction over ranks of input[rank's chunk]`: `input` holds world_size
    /// chunks of `output.numel()` elements.
    pub fn reduce_scatter(
        &mut self,
        input: &Tensor,
        output: &mut Tensor,
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        const DURING: &str = "reduce-scatter";
        let dtype = self.check_sized(input, output, self.world_size, 1)?;
        self.begin(DURING)?;
        let since = Instant::now();
        // SAFETY: both tensors are contiguous on this GPU with the sizes checked above, and
        // borrowed until `wait` has seen the operation complete.
        let r = unsafe {
            nc::reduce_scatter(
                input.data_ptr(),
                output.data_ptr(),
                output.numel(),
                dtype,
                red_op(op),
                self.comm,
                self.stream,
            )
        };
        self.finish_call(r, DURING, since)
    }

    /// `output` = every rank's `input`, in rank order.
    pub fn all_gather(
        &mut self,
        input: &Tensor,
        output: &mut Tensor,
    ) -> Result<(), CollectiveError> {
        const DURING: &str = "all-gather";
        let dtype = self.check_sized(input, output, 1, self.world_size)?;
        self.begin(DURING)?;
        let since = Instant::now();
        // SAFETY: as in `reduce_scatter`.
        let r = unsafe {
            nc::all_gather(
                input.data_ptr(),
                output.data_ptr(),
                input.numel(),
                dtype,
                self.comm,
                self.stream,
            )
        };
        self.finish_call(r, DURING, since)
    }

    /// Every rank's `tensor` becomes `root`'s.
    pub fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        const DURING: &str = "broadcast";
        let dtype = self.check_sized(tensor, tensor, 1, 1)?;
        self.begin(DURING)?;
        let since = Instant::now();
        let p = tensor.data_ptr();
        // SAFETY: a contiguous tensor on this GPU, borrowed until the operation completes.
        let r = unsafe {
            nc::broadcast(
                p,
                p,
                tensor.numel(),
                dtype,
                root as i32,
                self.comm,
                self.stream,
            )
        };
        self.finish_call(r, DURING, since)
    }

    /// Checks `input.numel() * in_parts == output.numel() * out_parts`, contiguity, dtype and
    /// device.
    fn check_sized(
        &self,
        input: &Tensor,
        output: &Tensor,
        out_parts: usize,
        in_parts: usize,
    ) -> Result<ncsys::ncclDataType_t, CollectiveError> {
        let dtype = self.check_tensor(input)?;
        self.check_tensor(output)?;
        if input.kind() != output.kind() || !input.is_contiguous() || !output.is_contiguous() {
            return Err(CollectiveError::UnsupportedTensor {
                kind: output.kind(),
                device: output.device(),
                expected: "contiguous input and output of one dtype (NCCL)",
            });
        }
        if input.numel() * in_parts != output.numel() * out_parts {
            return Err(CollectiveError::Setup(format!(
                "{} input elements do not fit {} output elements over {} ranks",
                input.numel(),
                output.numel(),
                self.world_size
            )));
        }
        Ok(dtype)
    }

    pub(super) fn finish_call(
        &mut self,
        r: Result<nc::NcclStatus, nc::NcclError>,
        during: &'static str,
        since: Instant,
    ) -> Result<(), CollectiveError> {
        if let Err(e) = r {
            self.break_comm();
            return Err(nccl_error(during, describe(e.0)));
        }
        self.settle(during, since)?;
        self.wait(during, since)
    }
}
