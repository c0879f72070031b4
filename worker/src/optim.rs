//! AdamW, the learning-rate schedule and gradient clipping.
//!
//! AdamW is written out (not libtorch's C++ optimizer) so that its state is ours to save and
//! restore exactly: `exp_avg`/`exp_avg_sq` per parameter plus the step count. The update is
//! torch.optim.AdamW's, operation for operation.

use ferrotune_data::trainer_state::OptimizerShards;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct ParamState {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// What a checkpoint saves of an optimizer and restores into it, whatever its sharding.
pub trait OptimizerState {
    fn step_count(&self) -> u64;
    fn set_step_count(&mut self, step: u64);
    /// Name and shape of every parameter, in the optimizer's order: the order in which the
    /// parameters are flattened end to end (what shard maps count in).
    fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)>;
    /// What a checkpoint saves: the moments per parameter (`exp_avg.<param>`,
    /// `exp_avg_sq.<param>`), or, sharded, this rank's range of the flat moments (`exp_avg`,
    /// `exp_avg_sq`, 1-D) described by [`OptimizerState::shards`].
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// A sharded optimizer: this rank, and the shard map of the whole group.
    fn shards(&self) -> Option<(usize, OptimizerShards)> {
        None
    }
    /// Restores elements `[from, from + len)` of parameter `index`'s flattened moments (1-D
    /// fp32 `exp_avg` and `exp_avg_sq` of `len` elements), or the part of them this optimizer
    /// keeps: restoring every piece of every parameter, then the step count, makes the next
    /// update the one the saved optimizer would have made.
    fn load_piece(&mut self, index: usize, from: i64, exp_avg: &Tensor, exp_avg_sq: &Tensor);
    /// The fp32 weights to checkpoint when the optimizer holds them instead of the model (ZeRO
    /// under bf16, on rank 0 after gathering); None: the model's own parameters.
    fn master_weights(&self) -> Option<Vec<(String, Tensor)>> {
        None
    }
}

/// torch.optim.AdamW's update number `step` at learning rate `lr`, for any tensor and its
/// moments: whole parameters (`AdamW`) or pieces of a flat chunk (`zero::ShardedAdamW`) get
/// the same operations, so the same elements get the same results.
pub(crate) struct UpdateRule {
    config: AdamWConfig,
    lr: f64,
    step_size: f64,
    bias_correction2_sqrt: f64,
}

impl UpdateRule {
    pub(crate) fn new(config: &AdamWConfig, step: u64, lr: f64) -> UpdateRule {
        let bias_correction1 = 1.0 - config.beta1.powi(step as i32);
        let bias_correction2 = 1.0 - config.beta2.powi(step as i32);
        UpdateRule {
            config: config.clone(),
            lr,
            step_size: lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.sqrt(),
        }
    }

    /// Updates `param` and its moments in place (the caller holds `no_grad`); `decay`: whether
    /// weight decay applies to it.
    pub(crate) fn apply(
        &self,
        param: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        decay: bool,
    ) {
        let c = &self.config;
        let mut param = param.shallow_clone();
        if decay && c.weight_decay != 0.0 {
            let _ = param.g_mul_scalar_(1.0 - self.lr * c.weight_decay);
        }
        let _ = exp_avg.shallow_clone().lerp_(grad, 1.0 - c.beta1);
        // tch's addcmul_/addcdiv_ take no `value`, so the scale goes on one operand.
        let _ = exp_avg_sq
            .shallow_clone()
            .g_mul_scalar_(c.beta2)
            .addcmul_(&(grad * (1.0 - c.beta2)), grad);
        let denom = (exp_avg_sq.sqrt() / self.bias_correction2_sqrt) + c.eps;
        let _ = param.addcdiv_(&(exp_avg * -self.step_size), &denom);
    }
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// Matrices and embeddings decay; vectors (norm weights, biases) do not, as in the usual
    /// GPT/Llama recipes.
    pub fn new(named: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let params = named
            .into_iter()
            .map(|(name, param)| ParamState {
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                decay: param.dim() >= 2,
                name,
                param,
            })
            .collect();
        AdamW {
            config,
            params,
            step: 0,
        }
    }

    /// One update from the parameters' own gradients.
    pub fn step(&mut self, lr: f64) {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.param.grad()).collect();
        self.step_with(lr, &grads);
    }

    /// One update from `grads`, one per parameter in order (undefined ones are skipped): the
    /// fp32 gradients of a low-precision compute copy, for instance.
    pub fn step_with(&mut self, lr: f64, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        self.step += 1;
        let rule = UpdateRule::new(&self.config, self.step, lr);
        tch::no_grad(|| {
            for (p, grad) in self.params.iter_mut().zip(grads) {
                if grad.defined() {
                    rule.apply(&p.param, grad, &p.exp_avg, &p.exp_avg_sq, p.decay);
                }
            }
        });
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
        }
    }

    /// The parameters, in the optimizer's (and the checkpoint's) order.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.param.shallow_clone())
            .collect()
    }

    pub fn gradients(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| p.param.grad())
            .filter(|g| g.defined())
            .collect()
    }
}

impl OptimizerState for AdamW {
    fn step_count(&self) -> u64 {
        self.step
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.param.size()))
            .collect()
    }

    fn load_piece(&mut self, index: usize, from: i64, exp_avg: &Tensor, exp_avg_sq: &Tensor) {
        let p = &self.params[index];
        let len = exp_avg.numel() as i64;
        tch::no_grad(|| {
            // The moments are contiguous (made by zeros_like): the flat views share them.
            p.exp_avg.view([-1]).narrow(0, from, len).copy_(exp_avg);
            p.exp_avg_sq
                .view([-1])
                .narrow(0, from, len)
                .copy_(exp_avg_sq);
        });
    }
}

/// Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`.
/// `step` counts from 0; the first step already gets lr/warmup rather than zero.
pub fn lr_at(step: u64, lr: f64, min_lr: f64, warmup_steps: u64, total_steps: u64) -> f64 {
    if step < warmup_steps {
        return lr * (step + 1) as f64 / warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
    let progress = ((step - warmup_steps) as f64 / decay_steps as f64).min(1.0);
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr)
}

/// Multiplies gradients by `scale` and then scales them so their global L2 norm is at most
/// `max_norm` (0: no clipping), as torch.nn.utils.clip_grad_norm_ does, in one pass over them.
/// Returns the norm after `scale`, before clipping. (The trainer's gradients are sums over the
/// global batch's tokens; `scale` = 1 / tokens turns them into the mean's.)
pub fn scale_and_clip(grads: &[Tensor], scale: f64, max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let squares: Vec<Tensor> = grads
            .iter()
            .map(|g| g.pow_tensor_scalar(2).sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt();
        let norm = total.double_value(&[]) * scale;
        let coef = clip_coefficient(norm, max_norm);
        if scale * coef != 1.0 {
            for g in grads {
                let _ = g.shallow_clone().g_mul_scalar_(scale * coef);
            }
        }
        norm
    })
}

/// What clip_grad_norm_ multiplies gradients of norm `norm` by (1: no clipping).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let (lr, min) = (1e-3, 1e-4);
        assert!((lr_at(0, lr, min, 4, 20) - 0.25e-3).abs() < 1e-12);
        assert!((lr_at(3, lr, min, 4, 20) - lr).abs() < 1e-12);
        assert!((lr_at(4, lr, min, 4, 20) - lr).abs() < 1e-12);
        assert!((lr_at(12, lr, min, 4, 20) - (min + 0.5 * (lr - min))).abs() < 1e-12);
        assert!((lr_at(20, lr, min, 4, 20) - min).abs() < 1e-12);
        assert!((lr_at(25, lr, min, 4, 20) - min).abs() < 1e-12);
    }
}
