//! The decoder's building blocks shared by every family: RMSNorm (Llama's `w * x̂` and Gemma's
//! `x̂ * (1 + w)`), weight initialisation, and the gated MLP (SwiGLU, or GeGLU for Gemma).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma: the weight is an offset from 1 (`x̂ * (1 + w)`, computed in fp32 before casting
    /// back), and starts at zero.
    offset: bool,
}

impl RmsNorm {
    pub(super) fn new(vs: nn::Path, dim: i64, eps: f64, offset: bool) -> Self {
        let weight = if offset {
            vs.zeros("weight", &[dim])
        } else {
            vs.ones("weight", &[dim])
        };
        RmsNorm {
            weight,
            eps,
            offset,
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        // Normalise in fp32 whatever the activation dtype, as transformers does.
        let dtype = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x32 * (variance + self.eps).rsqrt();
        if self.offset {
            // Gemma multiplies before casting back (transformers PR 29402), Llama after.
            (normed * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(dtype)
        } else {
            &self.weight * normed.to_kind(dtype)
        }
    }
}

/// N(0, std²), or zeros for std 0 (weights about to be overwritten from a checkpoint): tch
/// draws N(0, std²) as `randn * std`, two full-size temporaries per tensor that the allocator
/// keeps, which would double a loading model's peak memory for nothing.
pub(super) fn normal(std: f64) -> nn::Init {
    if std == 0.0 {
        nn::Init::Const(0.0)
    } else {
        nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        }
    }
}

pub(super) fn linear(vs: nn::Path, in_dim: i64, out_dim: i64, std: f64, bias: bool) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: normal(std),
        // transformers initialises biases to zero.
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(vs, in_dim, out_dim, config)
}

/// `down(act(gate(x)) * up(x))`: SwiGLU, or GeGLU with tanh-approximate GELU (Gemma's
/// `gelu_pytorch_tanh`).
#[derive(Debug)]
pub(super) struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
    gelu: bool,
}

impl Mlp {
    pub(super) fn new(vs: nn::Path, cfg: &super::ModelConfig) -> Self {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Mlp {
            gate_proj: linear(&vs / "gate_proj", h, i, std, cfg.mlp_bias),
            up_proj: linear(&vs / "up_proj", h, i, std, cfg.mlp_bias),
            down_proj: linear(&vs / "down_proj", i, h, std, cfg.mlp_bias),
            gelu: cfg.gemma.is_some(),
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x);
        let gate = if self.gelu {
            gate.gelu("tanh")
        } else {
            gate.silu()
        };
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}

/// Attention written out, as transformers' `eager_attention_forward` (Gemma 2's soft-capped
/// scores cannot go through SDPA): scores scaled, squashed as cap · tanh(scores / cap),
/// masked (`allowed`: bool, broadcast over batch and heads; None: every key), softmax in fp32,
/// values. Keys and values of grouped-query attention are repeated per query head.
pub(super) fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    allowed: Option<&Tensor>,
    scale: f64,
    cap: f64,
) -> Tensor {
    let n_rep = q.size()[1] / k.size()[1];
    let repeat = |t: &Tensor| {
        if n_rep == 1 {
            return t.shallow_clone();
        }
        let (b, h, s, d) = t.size4().expect("(batch, heads, seq, head_dim)");
        t.unsqueeze(2)
            .expand([b, h, n_rep, s, d], false)
            .reshape([b, h * n_rep, s, d])
    };
    let scores = q.matmul(&repeat(k).transpose(2, 3)) * scale;
    let scores = (scores / cap).tanh() * cap;
    let scores = match allowed {
        Some(m) => scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
        None => scores,
    };
    scores
        .softmax(-1, Kind::Float)
        .to_kind(q.kind())
        .matmul(&repeat(v))
}
