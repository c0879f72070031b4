//! Llama decoder: RMSNorm, rotary position embeddings, grouped-query attention through
//! libtorch's scaled_dot_product_attention, SwiGLU MLP. Parameter names are the Hugging Face
//! keys (`model.layers.0.self_attn.q_proj.weight`), so loading a checkpoint is a name lookup.

use super::LlamaConfig;
use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

/// Label value that contributes no loss (prompt tokens, padding), as in PyTorch and HF.
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: vs.ones("weight", &[dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // Normalise in fp32 whatever the activation dtype, as transformers does.
        let dtype = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x32 * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(dtype)
    }
}

fn linear(vs: nn::Path, in_dim: i64, out_dim: i64, std: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
        bs_init: None,
        bias: false,
    };
    nn::linear(vs, in_dim, out_dim, config)
}

/// Rotary embedding tables for given positions: cos and sin of shape (batch, 1, seq, head_dim).
fn rope_tables(positions: &Tensor, inv_freq: &Tensor) -> (Tensor, Tensor) {
    // (batch, seq, 1) * (head_dim/2) -> (batch, seq, head_dim/2)
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

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &LlamaConfig) -> Self {
        let (h, hd, std) = (cfg.hidden_size, cfg.head_dim(), cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        Attention {
            q_proj: linear(&vs / "q_proj", h, nh * hd, std),
            k_proj: linear(&vs / "k_proj", h, nkv * hd, std),
            v_proj: linear(&vs / "v_proj", h, nkv * hd, std),
            o_proj: linear(&vs / "o_proj", nh * hd, h, std),
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        }
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (b, s, _) = x.size3().expect("activations are (batch, seq, hidden)");
        let heads = |t: Tensor, n: i64| t.view([b, s, n, self.head_dim]).transpose(1, 2);
        // (batch, n_heads, seq, head_dim)
        let q = heads(self.q_proj.forward(x), self.n_heads);
        let k = heads(self.k_proj.forward(x), self.n_kv_heads);
        let v = heads(self.v_proj.forward(x), self.n_kv_heads);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            self.n_kv_heads != self.n_heads,
        );
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b, s, self.n_heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(vs: nn::Path, cfg: &LlamaConfig) -> Self {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Mlp {
            gate_proj: linear(&vs / "gate_proj", h, i, std),
            up_proj: linear(&vs / "up_proj", h, i, std),
            down_proj: linear(&vs / "down_proj", i, h, std),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &LlamaConfig) -> Self {
        DecoderLayer {
            input_layernorm: RmsNorm::new(
                &vs / "input_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
            self_attn: Attention::new(&vs / "self_attn", cfg),
            post_attention_layernorm: RmsNorm::new(
                &vs / "post_attention_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
            mlp: Mlp::new(&vs / "mlp", cfg),
        }
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let x = x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x), cos, sin);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

#[derive(Debug)]
pub struct Llama {
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// None when the output projection is tied to the input embedding.
    lm_head: Option<nn::Linear>,
    inv_freq: Tensor,
    vocab_size: i64,
}

impl Llama {
    /// Creates the parameters under `vs` (randomly initialised; load weights afterwards).
    pub fn new(vs: &nn::Path, cfg: &LlamaConfig) -> Self {
        let model = vs / "model";
        let embed_tokens = nn::embedding(
            &model / "embed_tokens",
            cfg.vocab_size,
            cfg.hidden_size,
            nn::EmbeddingConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: cfg.initializer_range,
                },
                ..Default::default()
            },
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model / "layers" / i, cfg))
            .collect();
        let norm = RmsNorm::new(&model / "norm", cfg.hidden_size, cfg.rms_norm_eps);
        let lm_head = (!cfg.tie_word_embeddings).then(|| {
            linear(
                vs / "lm_head",
                cfg.hidden_size,
                cfg.vocab_size,
                cfg.initializer_range,
            )
        });
        let hd = cfg.head_dim();
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, vs.device()))
            .to_kind(Kind::Float)
            / hd as f64;
        // 1 / theta^(2i/d), computed in fp32 as transformers does.
        let inv_freq = Tensor::pow_scalar(cfg.rope_theta, &exponents).reciprocal();
        Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            vocab_size: cfg.vocab_size,
        }
    }

    /// Logits (batch, seq, vocab) for token ids (batch, seq) at positions 0..seq.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (b, s) = input_ids.size2().expect("input_ids are (batch, seq)");
        let positions = Tensor::arange(s, (Kind::Int64, input_ids.device()))
            .unsqueeze(0)
            .expand([b, s], false);
        self.forward_at(input_ids, &positions)
    }

    /// Logits for token ids at explicit positions (batch, seq).
    pub fn forward_at(&self, input_ids: &Tensor, positions: &Tensor) -> Tensor {
        let (cos, sin) = rope_tables(positions, &self.inv_freq);
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin);
        }
        let x = self.norm.forward(&x);
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.matmul(&self.embed_tokens.ws.tr()),
        }
    }

    /// Summed cross-entropy over labelled positions and the number of those positions.
    /// Labels equal to [`IGNORE_INDEX`] contribute nothing. Summing (not averaging) lets the
    /// training loop divide by the token count of the whole global batch, so data parallel
    /// training gives exactly the gradient of one large batch.
    pub fn loss_sum(&self, input_ids: &Tensor, labels: &Tensor) -> (Tensor, i64) {
        let logits = self.forward(input_ids);
        let loss = logits
            .view([-1, self.vocab_size])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &labels.view([-1]),
                None,
                Reduction::Sum,
                IGNORE_INDEX,
                0.0,
            );
        let count = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
        (loss, count)
    }
}
