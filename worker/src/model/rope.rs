//! Rotary position embeddings, including the long-context rescalings (`linear`, `llama3`).
//! Frequencies are computed in fp32 with the same operations as transformers, so the tables
//! agree with it bit for bit rather than merely closely.

use super::config::{ModelConfig, RopeScaling};
use tch::{Device, Kind, Tensor};

/// 1 / theta^(2i/d) for i in 0..d/2, rescaled as the config asks.
pub fn inv_freq(cfg: &ModelConfig, device: Device) -> Tensor {
    inv_freq_of(cfg.head_dim(), cfg.rope_theta, &cfg.rope_scaling, device)
}

/// Gemma 3's sliding layers' frequencies (their own base); None for other models.
pub fn local_inv_freq(cfg: &ModelConfig, device: Device) -> Option<Tensor> {
    let (theta, scaling) = cfg.gemma.as_ref()?.local_rope.as_ref()?;
    Some(inv_freq_of(cfg.head_dim(), *theta, scaling, device))
}

fn inv_freq_of(hd: i64, theta: f64, scaling: &RopeScaling, device: Device) -> Tensor {
    let exponents =
        Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
    let inv_freq = Tensor::pow_scalar(theta, &exponents).reciprocal();
    match *scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            // Long wavelengths are divided by factor, short ones kept, the band between
            // interpolated smoothly.
            let long = wavelen.gt(low_freq_wavelen);
            let scaled = inv_freq.where_self(&long.logical_not(), &(&inv_freq / factor));
            let smooth = (wavelen.reciprocal() * old_len - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen
                .lt(high_freq_wavelen)
                .logical_not()
                .logical_and(&long.logical_not());
            smoothed.where_self(&medium, &scaled)
        }
    }
}

/// cos and sin tables of shape (batch, 1, seq, head_dim) for positions (batch, seq).
pub fn tables(positions: &Tensor, inv_freq: &Tensor) -> (Tensor, Tensor) {
    let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
    (emb.cos(), emb.sin())
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// Applies the rotation to (batch, heads, seq, head_dim) queries or keys.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (cos, sin) = (cos.to_kind(x.kind()), sin.to_kind(x.kind()));
    x * cos + rotate_half(x) * sin
}
