//! Gradients in one flat fp32 buffer, so the all-reduce works on them where they lie.
//!
//! Backward writes each parameter's gradient into its own tensor. Once those tensors are views
//! of one flat buffer (PyTorch DDP's `gradient_as_bucket_view`), the ring reduces the buffer in
//! place: no packing, no copies, no allocation per step. libtorch accumulates into a defined
//! `.grad` in place, and `zero_grad` zeroes it in place, so a gradient rebased onto a view stays
//! there step after step; every step checks that it still is, and rebases it if not.
//!
//! With a bf16 compute copy the flat buffer holds the fp32 upcast of its gradients instead.

use crate::precision::ComputeCopy;
use tch::{Kind, Tensor};

pub struct FlatGrads {
    /// Keeps the storage alive; the views below are what everyone uses.
    flat: Tensor,
    /// One view per parameter, shaped like it, in the optimizer's order.
    views: Vec<Tensor>,
}

impl FlatGrads {
    /// A zeroed buffer with one view per parameter, in order.
    pub fn new(params: &[Tensor]) -> FlatGrads {
        Self::padded(params, params.iter().map(|p| p.numel()).sum())
    }

    /// The same, in a buffer of `len` elements (at least the parameters'; the rest stays zero):
    /// ZeRO's chunks are equal.
    pub fn padded(params: &[Tensor], len: usize) -> FlatGrads {
        let total = len as i64;
        let device = params.first().map_or(tch::Device::Cpu, |p| p.device());
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let mut offset = 0;
        let views = params
            .iter()
            .map(|p| {
                let n = p.numel() as i64;
                let view = flat.narrow(0, offset, n).view(p.size().as_slice());
                offset += n;
                view
            })
            .collect();
        FlatGrads { flat, views }
    }

    pub fn device(&self) -> tch::Device {
        self.flat.device()
    }

    /// The whole buffer, padding included.
    pub fn flat(&self) -> Tensor {
        self.flat.shallow_clone()
    }

    fn views(&self) -> Vec<Tensor> {
        self.views.iter().map(|v| v.shallow_clone()).collect()
    }

    /// The fp32 parameters' own gradients, made views of the buffer (their values kept).
    /// None when some parameter has no gradient: then they are used as they are.
    pub fn adopt(&self, params: &[Tensor]) -> Option<Vec<Tensor>> {
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        if grads
            .iter()
            .any(|g| !g.defined() || g.kind() != Kind::Float)
        {
            return None;
        }
        tch::no_grad(|| {
            for (mut grad, view) in grads.into_iter().zip(&self.views) {
                if grad.data_ptr() == view.data_ptr() && grad.is_contiguous() {
                    continue;
                }
                view.shallow_clone().copy_(&grad);
                // The parameter's `.grad` is this same tensor: from now on it shares the view's
                // storage, and backward accumulates into it there.
                grad.set_data(view);
            }
        });
        Some(self.views())
    }

    /// As `adopt`, but a parameter without gradient leaves zeros in its view (ZeRO reduces the
    /// whole buffer, every parameter included).
    pub fn adopt_or_fill(&self, params: &[Tensor]) {
        if self.adopt(params).is_some() {
            return;
        }
        tch::no_grad(|| {
            for (p, view) in params.iter().zip(&self.views) {
                let grad = p.grad();
                let mut view = view.shallow_clone();
                if grad.defined() {
                    view.copy_(&grad);
                } else {
                    let _ = view.zero_();
                }
            }
        });
    }

    /// The compute copy's gradients upcast into the buffer; they are zeroed for the next step.
    pub fn upcast_from(&self, compute: &ComputeCopy) -> Vec<Tensor> {
        compute.move_grads_into(&self.views);
        self.views()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_accumulate_in_the_flat_buffer_across_steps() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[4.0f32, 5.0]).set_requires_grad(true);
        let params = [a.shallow_clone(), b.shallow_clone()];
        let loss = || (&a * &a).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float);
        loss().backward();
        let flat = FlatGrads::new(&params);
        let grads = flat.adopt(&params).expect("every parameter has a gradient");
        let base = grads[0].data_ptr() as usize;
        assert_eq!(
            b.grad().data_ptr() as usize,
            base + 3 * 4,
            "b's grad follows a's"
        );
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), [2.0, 4.0, 6.0]);
        // A second backward accumulates where the views are; zero_grad zeroes them there.
        loss().backward();
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [4.0, 8.0, 12.0]);
        assert_eq!(Vec::<f32>::try_from(&grads[1]).unwrap(), [6.0, 6.0]);
        let (mut a2, mut b2) = (a.shallow_clone(), b.shallow_clone());
        a2.zero_grad();
        b2.zero_grad();
        loss().backward();
        assert_eq!(a.grad().data_ptr() as usize, base);
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [2.0, 4.0, 6.0]);
        assert_eq!(Vec::<f32>::try_from(&grads[1]).unwrap(), [3.0, 3.0]);
    }

    #[test]
    fn a_parameter_without_gradient_keeps_the_plain_path() {
        let a = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let unused = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        (&a * 2.0).sum(Kind::Float).backward();
        let params = [a, unused];
        assert!(FlatGrads::new(&params).adopt(&params).is_none());
    }
}
