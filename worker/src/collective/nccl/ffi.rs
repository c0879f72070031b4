//! What the rest of the NCCL backend needs from NCCL and libtorch beyond the communicator:
//! library checks, unique ids, dtype and op mapping, libtorch's current stream, the config.

use crate::collective::{CollectiveError, ReduceOp};
use cudarc::nccl::{result as nc, sys as ncsys};
use tch::Kind;

/// The size of `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

pub(super) const NO_LIBRARY: &str = "libnccl.so cannot be loaded: `scripts/setup-libtorch.sh --cuda` installs NCCL beside libtorch and links libnccl.so to libnccl.so.2; elsewhere put a directory holding libnccl.so (a link to the nvidia-nccl wheel's libnccl.so.2) on LD_LIBRARY_PATH";
pub(super) const NO_DRIVER: &str = "no NVIDIA driver: libcuda.so cannot be loaded";

pub(super) fn nccl_error(during: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Nccl {
        during,
        message: message.into(),
    }
}

/// NCCL's own text for a result code.
pub(super) fn describe(code: ncsys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string for every
    // result code; the library is loaded (every caller got `code` from an NCCL call).
    let text = unsafe { std::ffi::CStr::from_ptr(ncsys::ncclGetErrorString(code)) };
    format!("{} ({code:?})", text.to_string_lossy())
}

/// Whether this process can load NCCL; Err says what is missing and how to get it.
pub fn check_library() -> Result<(), String> {
    // SAFETY: only tries to dlopen the names cudarc would load; no NCCL function is called.
    if unsafe { ncsys::is_culib_present() } {
        Ok(())
    } else {
        Err(NO_LIBRARY.to_string())
    }
}

/// A fresh unique id, offered to the coordinator at registration (used if this worker
/// becomes rank 0). NCCL starts a bootstrap listener for it, which lives until the ranks
/// connect: one unused listener per registration of a worker that does not become rank 0.
pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    check_library().map_err(|m| nccl_error("creating a unique id", m))?;
    let id = nc::get_uniqueid().map_err(|e| nccl_error("creating a unique id", describe(e.0)))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// Maps a tensor dtype to NCCL's.
pub fn data_type(kind: Kind) -> Option<ncsys::ncclDataType_t> {
    use ncsys::ncclDataType_t as T;
    match kind {
        Kind::Float => Some(T::ncclFloat32),
        Kind::Double => Some(T::ncclFloat64),
        Kind::BFloat16 => Some(T::ncclBfloat16),
        Kind::Half => Some(T::ncclFloat16),
        Kind::Int => Some(T::ncclInt32),
        Kind::Int64 => Some(T::ncclInt64),
        _ => None,
    }
}

pub(super) fn red_op(op: ReduceOp) -> ncsys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncsys::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => ncsys::ncclRedOp_t::ncclAvg,
    }
}

/// libtorch's current stream on `ordinal`, or None when this libtorch does not export the
/// lookup (then the caller synchronises and uses the NULL stream).
pub(super) fn current_stream(ordinal: usize) -> Option<ncsys::cudaStream_t> {
    type Lookup = unsafe extern "C" fn(i32, *mut *mut std::ffi::c_void) -> i32;
    // SAFETY: dlsym with RTLD_DEFAULT only searches the symbols already loaded; the name is a
    // NUL-terminated literal.
    let symbol = unsafe {
        libc::dlsym(
            libc::RTLD_DEFAULT,
            c"aoti_torch_get_current_cuda_stream".as_ptr(),
        )
    };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: libtorch declares `AOTITorchError aoti_torch_get_current_cuda_stream(int32_t
    // device_index, void** ret_stream)` with C linkage; AOTITorchError is int32_t.
    let lookup: Lookup = unsafe { std::mem::transmute::<*mut std::ffi::c_void, Lookup>(symbol) };
    let mut stream: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: `stream` is a valid out-pointer for the duration of the call.
    let status = unsafe { lookup(ordinal as i32, &mut stream) };
    (status == 0).then_some(stream.cast())
}

/// The config NCCL's `NCCL_CONFIG_INITIALIZER` gives, made non-blocking.
pub(super) fn nonblocking_config() -> ncsys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    ncsys::ncclConfig_t {
        size: std::mem::size_of::<ncsys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 28, 0): the layout of the struct cudarc declares.
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_ncclconfig_initializer_made_nonblocking() {
        let c = nonblocking_config();
        assert_eq!(c.size, std::mem::size_of::<ncsys::ncclConfig_t>());
        assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, 22800, 0));
        assert_eq!(c.minCTAs, i32::MIN);
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn training_dtypes_map_to_nccl_and_others_are_refused() {
        use ncsys::ncclDataType_t as T;
        assert_eq!(data_type(Kind::Float), Some(T::ncclFloat32));
        assert_eq!(data_type(Kind::BFloat16), Some(T::ncclBfloat16));
        assert_eq!(data_type(Kind::Double), Some(T::ncclFloat64));
        assert_eq!(data_type(Kind::Bool), None);
        assert_eq!(red_op(ReduceOp::Mean), ncsys::ncclRedOp_t::ncclAvg);
    }
}
