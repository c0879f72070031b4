//! Tensor memory as the ring sees it: one flat `f32` slice per bucket.
//!
//! When a group of tensors already lies back to back in one allocation (gradients that are
//! views of one flat buffer, see `optim::FlatGrads`), the ring reduces that memory in place:
//! no copy at all. Otherwise each bucket is packed into a reused buffer and unpacked after,
//! one `memcpy` each way, with no allocation per step.

use super::CollectiveError;
use tch::{Device, Kind, Tensor};

/// Every tensor must be fp32 on the CPU: that is what the TCP ring sums.
pub fn check_tensors(tensors: &[Tensor]) -> Result<(), CollectiveError> {
    for t in tensors {
        if t.kind() != Kind::Float || t.device() != Device::Cpu {
            return Err(CollectiveError::UnsupportedTensor {
                kind: t.kind(),
                device: t.device(),
                expected: "fp32 tensors on the CPU (the TCP ring)",
            });
        }
    }
    Ok(())
}

/// The tensors' memory as one region `(address, elements)`, when they share a dtype, are
/// contiguous and each starts where the one before ends (empty tensors are skipped). Works for
/// any device: the ring reads it as a host slice, NCCL passes the device address on.
pub fn one_region(tensors: &[Tensor]) -> Option<(usize, usize)> {
    let mut start: Option<usize> = None;
    let mut end = 0usize;
    let mut total = 0usize;
    let mut kind = None;
    for t in tensors.iter() {
        let n = t.numel();
        if n == 0 {
            continue;
        }
        if !t.is_contiguous() || kind.is_some_and(|k| k != t.kind()) {
            return None;
        }
        kind = Some(t.kind());
        let p = t.data_ptr() as usize;
        match start {
            None => start = Some(p),
            Some(_) if p != end => return None,
            Some(_) => {}
        }
        end = p + n * t.kind().elt_size_in_bytes();
        total += n;
    }
    Some((start?, total))
}

/// The tensors' memory as one slice, when they are one region (see [`one_region`]).
pub fn as_one_slice(tensors: &mut [Tensor]) -> Option<&mut [f32]> {
    let (start, total) = one_region(tensors)?;
    // SAFETY: the tensors are contiguous fp32 CPU tensors (checked by `check_tensors` before
    // the ring calls this) that tile `total` elements from `start` exactly, and `tensors` is
    // borrowed mutably for the slice's lifetime, so the storage stays alive and nothing else in
    // this thread touches it meanwhile.
    Some(unsafe { std::slice::from_raw_parts_mut(start as *mut f32, total) })
}

/// One contiguous tensor's memory, read-only.
fn contiguous_data(t: &Tensor) -> &[f32] {
    debug_assert!(t.is_contiguous() && t.kind() == Kind::Float);
    // SAFETY: `t` is a contiguous fp32 CPU tensor of numel() elements, alive while borrowed.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) }
}

/// Copies the tensors, in order, into `bucket` (resized to their total size).
pub fn pack(tensors: &[Tensor], bucket: &mut Vec<f32>) {
    let total: usize = tensors.iter().map(|t| t.numel()).sum();
    bucket.clear();
    bucket.reserve(total);
    for t in tensors {
        if t.numel() == 0 {
            continue;
        }
        if t.is_contiguous() {
            bucket.extend_from_slice(contiguous_data(t));
        } else {
            bucket.extend_from_slice(contiguous_data(&t.contiguous()));
        }
    }
}

/// Copies `bucket` back into the tensors it was packed from.
pub fn unpack(bucket: &[f32], tensors: &mut [Tensor]) {
    let mut offset = 0;
    for t in tensors.iter_mut() {
        let n = t.numel();
        if n == 0 {
            continue;
        }
        let src = &bucket[offset..offset + n];
        offset += n;
        if t.is_contiguous() {
            // SAFETY: a contiguous fp32 CPU tensor of n elements, borrowed mutably here.
            let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
            dst.copy_from_slice(src);
        } else {
            let values = Tensor::from_slice(src).view(t.size().as_slice());
            tch::no_grad(|| t.copy_(&values));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_back_to_back_are_one_slice_and_anything_else_is_packed() {
        let flat = Tensor::arange(10, (Kind::Float, Device::Cpu));
        let mut tiled = vec![
            flat.narrow(0, 0, 4).view([2, 2]),
            flat.narrow(0, 4, 0),
            flat.narrow(0, 4, 6),
        ];
        let memory = as_one_slice(&mut tiled).expect("views that tile the buffer");
        assert_eq!(memory.len(), 10);
        assert_eq!(memory.as_ptr() as usize, flat.data_ptr() as usize);

        let mut gap = vec![flat.narrow(0, 0, 4), flat.narrow(0, 5, 5)];
        assert!(as_one_slice(&mut gap).is_none());
        let mut reordered = vec![flat.narrow(0, 4, 6), flat.narrow(0, 0, 4)];
        assert!(as_one_slice(&mut reordered).is_none());
        let mut strided = vec![flat.view([2, 5]).transpose(0, 1)];
        assert!(as_one_slice(&mut strided).is_none());
        // The region is counted in elements of the tensors' dtype, and one dtype only.
        let doubles = Tensor::arange(6, (Kind::Double, Device::Cpu));
        let halves = [doubles.narrow(0, 0, 2), doubles.narrow(0, 2, 4)];
        assert_eq!(one_region(&halves), Some((doubles.data_ptr() as usize, 6)));
        let bytes = Tensor::zeros([16], (Kind::Uint8, Device::Cpu));
        let mixed = [
            bytes.narrow(0, 0, 8).view_dtype(Kind::Float),
            bytes.narrow(0, 8, 8).view_dtype(Kind::Double),
        ];
        assert_eq!(one_region(&mixed), None);

        // The packing path round-trips, whatever the layout.
        let mut bucket = Vec::new();
        pack(&strided, &mut bucket);
        let expected: Vec<f32> = Vec::try_from(strided[0].contiguous().view(-1)).unwrap();
        assert_eq!(bucket, expected);
        let doubled: Vec<f32> = bucket.iter().map(|x| x * 2.0).collect();
        unpack(&doubled, &mut strided);
        assert_eq!(
            Vec::<f32>::try_from(flat.view(-1)).unwrap(),
            (0..10).map(|x| 2.0 * x as f32).collect::<Vec<_>>()
        );
    }
}
