//! Mixed precision: bf16 compute weights, fp32 master weights and fp32 AdamW state.
//!
//! Forward and backward run on a bf16 copy of the model; its gradients are upcast to fp32,
//! all-reduced, clipped and applied by AdamW to the fp32 masters, which are then cast back into
//! the copy. Updates far smaller than a bf16 weight's precision (8 bits of mantissa: lr × a
//! normalised Adam step is often below 2⁻⁸ of the weight) accumulate in the masters instead of
//! rounding away. Checkpoints are written from the masters. (tch's autocast only toggles CUDA
//! autocast at its default fp16, with no dtype setter; a cast copy needs nothing beyond tch.)

use crate::model::io::LoadedModel;
use crate::model::Llama;
use tch::{nn, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "fp32" | "float32" | "" => Some(Precision::Fp32),
            "bf16" | "bfloat16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// The low-precision copy of a model that forward and backward run on.
pub struct ComputeCopy {
    _vs: nn::VarStore,
    pub model: Llama,
    /// (master, compute) in the masters' name order, which is the optimizer's.
    pairs: Vec<(Tensor, Tensor)>,
}

impl ComputeCopy {
    pub fn new(master: &LoadedModel, kind: Kind) -> Self {
        let mut vs = nn::VarStore::new(master.vs.device());
        // Made in `kind` and as zeros (initializer_range 0 draws nothing), then cast from the
        // masters below: a random fp32 init first would briefly cost a whole fp32 model more.
        vs.set_kind(kind);
        let config = crate::model::ModelConfig {
            initializer_range: 0.0,
            ..master.config.clone()
        };
        let model = Llama::new(&vs.root(), &config);
        let compute = vs.variables();
        let pairs = master
            .named_parameters()
            .into_iter()
            .map(|(name, m)| {
                let c = compute[&name].shallow_clone();
                (m, c)
            })
            .collect();
        let copy = ComputeCopy {
            _vs: vs,
            model,
            pairs,
        };
        copy.sync();
        copy
    }

    /// The compute weights' dtype.
    pub fn kind(&self) -> Kind {
        self.pairs.first().map_or(Kind::BFloat16, |(_, c)| c.kind())
    }

    /// The compute weights, in the masters' (and optimizer's) order.
    pub fn model_parameters(&self) -> Vec<Tensor> {
        self.pairs.iter().map(|(_, c)| c.shallow_clone()).collect()
    }

    /// Casts the masters into the compute weights (after every optimizer step).
    pub fn sync(&self) {
        tch::no_grad(|| {
            for (m, c) in &self.pairs {
                c.shallow_clone().copy_(m);
            }
        });
    }

    /// Upcasts the compute weights' gradients into `into` (fp32, one per parameter in the
    /// optimizer's order; zeros where a weight got no gradient) and zeroes them for the next step.
    pub fn move_grads_into(&self, into: &[Tensor]) {
        assert_eq!(into.len(), self.pairs.len(), "one gradient per parameter");
        tch::no_grad(|| {
            for ((_, c), out) in self.pairs.iter().zip(into) {
                let mut g = c.grad();
                let mut out = out.shallow_clone();
                if g.defined() {
                    out.copy_(&g);
                    let _ = g.zero_();
                } else {
                    let _ = out.zero_();
                }
            }
        });
    }
}
