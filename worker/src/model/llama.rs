//! Llama decoder: RMSNorm, rotary position embeddings, grouped-query attention through
//! libtorch's scaled_dot_product_attention, SwiGLU MLP. Parameter names are the Hugging Face
//! keys (`model.layers.0.self_attn.q_proj.weight`), so loading a checkpoint is a name lookup.

use super::config::ModelConfig;
use super::rope;
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

/// N(0, std²), or zeros for std 0 (weights about to be overwritten from a checkpoint): tch
/// draws N(0, std²) as `randn * std`, two full-size temporaries per tensor that the allocator
/// keeps, which would double a loading model's peak memory for nothing.
fn normal(std: f64) -> nn::Init {
    if std == 0.0 {
        nn::Init::Const(0.0)
    } else {
        nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        }
    }
}

fn linear(vs: nn::Path, in_dim: i64, out_dim: i64, std: f64, bias: bool) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: normal(std),
        // transformers initialises biases to zero.
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(vs, in_dim, out_dim, config)
}

/// Keys and values of the tokens seen so far, per layer, for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

impl KvCache {
    /// Number of positions already cached: the next token's position.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The attention pattern of `q_len` queries that are the last positions of `k_len` keys:
/// causal, and within `window` tokens when a sliding window applies. None means plain causal
/// attention (q_len == k_len) or no restriction at all (one query that sees every key).
fn attention_mask(
    q_len: i64,
    k_len: i64,
    window: Option<i64>,
    device: tch::Device,
) -> Option<Tensor> {
    let cut = window.is_some_and(|w| w < k_len);
    if !cut && (q_len == k_len || q_len == 1) {
        return None;
    }
    let q_pos = Tensor::arange_start(k_len - q_len, k_len, (Kind::Int64, device)).unsqueeze(1);
    let k_pos = Tensor::arange(k_len, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = k_pos.le_tensor(&q_pos);
    if let Some(w) = window {
        // transformers: kv_idx > q_idx - sliding_window.
        allowed = allowed.logical_and(&k_pos.gt_tensor(&(&q_pos - w)));
    }
    Some(allowed)
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    /// Qwen3: per-head RMSNorm of queries and keys before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<i64>,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
        let (h, hd, std) = (cfg.hidden_size, cfg.head_dim(), cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        Attention {
            q_proj: linear(&vs / "q_proj", h, nh * hd, std, cfg.qkv_bias),
            k_proj: linear(&vs / "k_proj", h, nkv * hd, std, cfg.qkv_bias),
            v_proj: linear(&vs / "v_proj", h, nkv * hd, std, cfg.qkv_bias),
            o_proj: linear(&vs / "o_proj", nh * hd, h, std, cfg.o_bias),
            qk_norm: cfg.qk_norm.then(|| {
                (
                    RmsNorm::new(&vs / "q_norm", hd, cfg.rms_norm_eps),
                    RmsNorm::new(&vs / "k_norm", hd, cfg.rms_norm_eps),
                )
            }),
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            sliding_window: cfg.sliding_window,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        packed_mask: Option<&Tensor>,
    ) -> Tensor {
        let (b, s, _) = x.size3().expect("activations are (batch, seq, hidden)");
        let heads = |t: Tensor, n: i64| t.view([b, s, n, self.head_dim]).transpose(1, 2);
        // (batch, n_heads, seq, head_dim)
        let (mut q, mut k) = (
            heads(self.q_proj.forward(x), self.n_heads),
            heads(self.k_proj.forward(x), self.n_kv_heads),
        );
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            // Over head_dim, the last axis: each head's vector on its own.
            (q, k) = (q_norm.forward(&q), k_norm.forward(&k));
        }
        let q = rope::apply(&q, cos, sin);
        let mut k = rope::apply(&k, cos, sin);
        let mut v = heads(self.v_proj.forward(x), self.n_kv_heads);
        if let Some(slot) = cache {
            if let Some((past_k, past_v)) = slot.take() {
                k = Tensor::cat(&[&past_k, &k], 2);
                v = Tensor::cat(&[&past_v, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let k_len = k.size()[2];
        let mask = match packed_mask {
            Some(m) => Some(m.shallow_clone()),
            None => attention_mask(s, k_len, self.sliding_window, x.device()),
        };
        let causal = mask.is_none() && s == k_len && s > 1;
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            0.0,
            causal,
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
    fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
        let (h, i, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Mlp {
            gate_proj: linear(&vs / "gate_proj", h, i, std, cfg.mlp_bias),
            up_proj: linear(&vs / "up_proj", h, i, std, cfg.mlp_bias),
            down_proj: linear(&vs / "down_proj", i, h, std, cfg.mlp_bias),
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
    fn new(vs: nn::Path, cfg: &ModelConfig) -> Self {
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

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        packed_mask: Option<&Tensor>,
    ) -> Tensor {
        let x = x + self.self_attn.forward(
            &self.input_layernorm.forward(x),
            cos,
            sin,
            cache,
            packed_mask,
        );
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
    sliding_window: Option<i64>,
}

/// Several samples in one row: each token's position within its own sample and the sample it
/// belongs to. Attention never crosses samples, so each sample's logits are those it has alone.
pub struct Packing {
    /// (batch, seq) int64.
    pub positions: Tensor,
    /// (batch, seq) int64; tokens attend only to earlier tokens with the same id.
    pub segments: Tensor,
}

impl Packing {
    /// (batch, 1, seq, seq) bool: causal, same segment, and within `window` when one applies.
    fn mask(&self, window: Option<i64>) -> Tensor {
        let s = self.segments.size()[1];
        let idx = Tensor::arange(s, (Kind::Int64, self.segments.device()));
        let (q, k) = (idx.unsqueeze(1), idx.unsqueeze(0));
        let mut allowed = k.le_tensor(&q);
        if let Some(w) = window {
            allowed = allowed.logical_and(&k.gt_tensor(&(&q - w)));
        }
        let same = self
            .segments
            .unsqueeze(2)
            .eq_tensor(&self.segments.unsqueeze(1));
        same.logical_and(&allowed).unsqueeze(1)
    }
}

impl Llama {
    /// Creates the parameters under `vs` (randomly initialised; load weights afterwards).
    pub fn new(vs: &nn::Path, cfg: &ModelConfig) -> Self {
        let model = vs / "model";
        let embed_tokens = nn::embedding(
            &model / "embed_tokens",
            cfg.vocab_size,
            cfg.hidden_size,
            nn::EmbeddingConfig {
                ws_init: normal(cfg.initializer_range),
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
                false,
            )
        });
        Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq: rope::inv_freq(cfg, vs.device()),
            vocab_size: cfg.vocab_size,
            sliding_window: cfg.sliding_window,
        }
    }

    fn positions(input_ids: &Tensor, start: i64) -> Tensor {
        let (b, s) = input_ids.size2().expect("input_ids are (batch, seq)");
        Tensor::arange_start(start, start + s, (Kind::Int64, input_ids.device()))
            .unsqueeze(0)
            .expand([b, s], false)
    }

    pub(super) fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    pub(super) fn head(&self, x: &Tensor) -> Tensor {
        let x = self.norm.forward(x);
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.matmul(&self.embed_tokens.ws.tr()),
        }
    }

    /// Logits (batch, seq, vocab) for token ids (batch, seq) at positions 0..seq.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.forward_at(input_ids, &Self::positions(input_ids, 0))
    }

    /// Logits for token ids at explicit positions (batch, seq).
    pub fn forward_at(&self, input_ids: &Tensor, positions: &Tensor) -> Tensor {
        self.forward_masked(input_ids, positions, None)
    }

    fn forward_masked(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        self.head(&self.hidden_masked(input_ids, positions, mask))
    }

    /// The last decoder layer's output (before the final norm and the head).
    fn hidden_masked(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (cos, sin) = rope::tables(positions, &self.inv_freq);
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, None, mask);
        }
        x
    }

    /// Logits of rows that may hold several samples (plain causal rows when `packing` is None).
    pub fn forward_packed(&self, input_ids: &Tensor, packing: Option<&Packing>) -> Tensor {
        self.head(&self.hidden_packed(input_ids, packing))
    }

    /// [`Llama::forward_packed`] before the final norm and the head.
    pub(super) fn hidden_packed(&self, input_ids: &Tensor, packing: Option<&Packing>) -> Tensor {
        match packing {
            None => self.hidden_masked(input_ids, &Self::positions(input_ids, 0), None),
            Some(p) => {
                let mask = p.mask(self.sliding_window);
                self.hidden_masked(input_ids, &p.positions, Some(&mask))
            }
        }
    }

    /// Logits for tokens that follow the ones already in `cache`, which they are appended to.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let (cos, sin) = rope::tables(&Self::positions(input_ids, cache.len), &self.inv_freq);
        let mut x = self.embed_tokens.forward(input_ids);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, Some(slot), None);
        }
        cache.len += input_ids.size()[1];
        self.head(&x)
    }

    /// Cross-entropy in fp32, summed or per position (flattened).
    pub(super) fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        reduction: Reduction,
    ) -> Tensor {
        // reshape, not view: callers may pass labels sliced out of a longer window.
        logits
            .reshape([-1, self.vocab_size])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(&labels.reshape([-1]), None, reduction, IGNORE_INDEX, 0.0)
    }

    fn loss_of(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        self.cross_entropy(logits, labels, Reduction::Sum)
    }

    /// Summed cross-entropy over labelled positions and the number of those positions.
    /// Labels equal to [`IGNORE_INDEX`] contribute nothing. Summing (not averaging) lets the
    /// training loop divide by the token count of the whole global batch, so data parallel
    /// training gives exactly the gradient of one large batch.
    pub fn loss_sum(&self, input_ids: &Tensor, labels: &Tensor) -> (Tensor, i64) {
        self.loss_sum_packed(input_ids, labels, None)
    }

    /// [`Llama::loss_sum`] over rows that may hold several samples.
    pub fn loss_sum_packed(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        packing: Option<&Packing>,
    ) -> (Tensor, i64) {
        let loss = self.loss_of(&self.forward_packed(input_ids, packing), labels);
        let count = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
        (loss, count)
    }

    /// Cross-entropy of every position (batch, seq), 0 where the label is ignored: per-sample
    /// and per-task losses are sums over parts of it.
    pub fn token_losses(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        packing: Option<&Packing>,
    ) -> Tensor {
        let logits = self.forward_packed(input_ids, packing);
        self.cross_entropy(&logits, labels, Reduction::None)
            .reshape(labels.size())
    }

    /// Accumulates the gradient of `scale * loss_sum` into the parameters and returns the
    /// (unscaled) loss sum, keeping only each decoder layer's input alive between the forward
    /// and the backward pass: the layer is recomputed during backward (activation
    /// checkpointing). Each segment's backward is seeded with the gradient flowing into its
    /// output, which is what the recorded graph would have propagated, so the gradients are
    /// those of [`Llama::loss_sum`] up to floating-point reassociation.
    pub fn loss_sum_backward_checkpointed(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        packing: Option<&Packing>,
        scale: f64,
    ) -> f64 {
        let positions = match packing {
            Some(p) => p.positions.shallow_clone(),
            None => Self::positions(input_ids, 0),
        };
        let mask = packing.map(|p| p.mask(self.sliding_window));
        let mask = mask.as_ref();
        let (cos, sin) = rope::tables(&positions, &self.inv_freq);
        let mut layer_inputs = Vec::with_capacity(self.layers.len());
        let hidden = tch::no_grad(|| {
            let mut x = self.embed_tokens.forward(input_ids);
            for layer in &self.layers {
                let next = layer.forward(&x, &cos, &sin, None, mask);
                layer_inputs.push(x);
                x = next;
            }
            x
        });
        let (loss_value, mut upstream) =
            self.head_loss_backward(&hidden, labels, scale, super::loss::CHUNK_ELEMENTS);
        for (layer, input) in self.layers.iter().zip(layer_inputs).rev() {
            let input = input.set_requires_grad(true);
            let out = layer.forward(&input, &cos, &sin, None, mask);
            (out * &upstream).sum(Kind::Float).backward();
            upstream = input.grad();
        }
        (self.embed_tokens.forward(input_ids) * &upstream)
            .sum(Kind::Float)
            .backward();
        loss_value
    }
}
