//! Llama decoder: RMSNorm, rotary position embeddings, grouped-query attention through
//! libtorch's scaled_dot_product_attention, SwiGLU MLP. Parameter names are the Hugging Face
//! keys (`model.layers.0.self_attn.q_proj.weight`), so loading a checkpoint is a name lookup.
//! Gemma 3 is the same decoder with options (`ModelConfig::gemma`): offset norms, scaled
//! embeddings, GeGLU, sandwich norms, its attention scale, sliding layers with a local RoPE.

use super::config::ModelConfig;
use super::layers::{linear, normal, softcapped_attention, Mlp, RmsNorm};
use super::rope;
use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

/// Label value that contributes no loss (prompt tokens, padding), as in PyTorch and HF.
pub const IGNORE_INDEX: i64 = -100;

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
    /// Qwen3, Gemma 3: per-head RMSNorm of queries and keys before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
    sliding_window: Option<i64>,
    /// Gemma 3's scale of the scores (query_pre_attn_scalar^-½); None: head_dim^-½.
    scale: Option<f64>,
    /// Gemma 3's sliding layers rotate with the local RoPE tables.
    local_rope: bool,
    /// Gemma 2's soft-capping of the scores.
    softcap: Option<f64>,
}

/// The rotary tables of one forward pass: the global ones and, for Gemma 3's sliding layers,
/// the local ones.
struct RopeTables {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

/// The masks of packed rows: for layers that attend to everything before and for those with a
/// sliding window (built only where such layers exist).
struct PackedMasks {
    full: Option<Tensor>,
    windowed: Option<Tensor>,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &ModelConfig, layer: usize) -> Self {
        let (h, hd, std) = (cfg.hidden_size, cfg.head_dim(), cfg.initializer_range);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let gemma = cfg.gemma.as_ref();
        let sliding = gemma.is_none_or(|g| g.sliding_layers[layer]);
        let offset = gemma.is_some();
        Attention {
            q_proj: linear(&vs / "q_proj", h, nh * hd, std, cfg.qkv_bias),
            k_proj: linear(&vs / "k_proj", h, nkv * hd, std, cfg.qkv_bias),
            v_proj: linear(&vs / "v_proj", h, nkv * hd, std, cfg.qkv_bias),
            o_proj: linear(&vs / "o_proj", nh * hd, h, std, cfg.o_bias),
            qk_norm: cfg.qk_norm.then(|| {
                (
                    RmsNorm::new(&vs / "q_norm", hd, cfg.rms_norm_eps, offset),
                    RmsNorm::new(&vs / "k_norm", hd, cfg.rms_norm_eps, offset),
                )
            }),
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            sliding_window: cfg.sliding_window.filter(|_| sliding),
            scale: gemma.map(|g| g.query_pre_attn_scalar.powf(-0.5)),
            local_rope: gemma.is_some_and(|g| g.local_rope.is_some()) && sliding,
            softcap: gemma.and_then(|g| g.attn_logit_softcapping),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        packed: Option<&PackedMasks>,
    ) -> Tensor {
        let (cos, sin) = match (&rope.local, self.local_rope) {
            (Some(local), true) => (&local.0, &local.1),
            _ => (&rope.global.0, &rope.global.1),
        };
        let packed_mask = packed.and_then(|m| match self.sliding_window {
            Some(_) => m.windowed.as_ref(),
            None => m.full.as_ref(),
        });
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
        let y = match self.softcap {
            Some(cap) => {
                // The causal mask SDPA would have applied by itself, made explicit.
                let mask = mask.or_else(|| {
                    causal
                        .then(|| Tensor::ones([s, k_len], (Kind::Bool, x.device())).tril(k_len - s))
                });
                let scale = self.scale.unwrap_or((self.head_dim as f64).powf(-0.5));
                softcapped_attention(&q, &k, &v, mask.as_ref(), scale, cap)
            }
            None => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                mask,
                0.0,
                causal,
                self.scale,
                self.n_kv_heads != self.n_heads,
            ),
        };
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b, s, self.n_heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Llama: the norm before the MLP; Gemma 3: the norm of the attention's output.
    post_attention_layernorm: RmsNorm,
    /// Gemma 3: the norms before and after the MLP.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(vs: nn::Path, cfg: &ModelConfig, layer: usize) -> Self {
        let offset = cfg.gemma.is_some();
        let norm = |name: &str| RmsNorm::new(&vs / name, cfg.hidden_size, cfg.rms_norm_eps, offset);
        DecoderLayer {
            input_layernorm: norm("input_layernorm"),
            self_attn: Attention::new(&vs / "self_attn", cfg, layer),
            post_attention_layernorm: norm("post_attention_layernorm"),
            feedforward_norms: offset.then(|| {
                (
                    norm("pre_feedforward_layernorm"),
                    norm("post_feedforward_layernorm"),
                )
            }),
            mlp: Mlp::new(&vs / "mlp", cfg),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        packed: Option<&PackedMasks>,
    ) -> Tensor {
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(x), rope, cache, packed);
        match &self.feedforward_norms {
            None => {
                let x = x + attended;
                &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
            }
            Some((pre, post)) => {
                let x = x + self.post_attention_layernorm.forward(&attended);
                &x + post.forward(&self.mlp.forward(&pre.forward(&x)))
            }
        }
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
    /// Gemma 3's sliding layers' RoPE frequencies.
    local_inv_freq: Option<Tensor>,
    vocab_size: i64,
    sliding_window: Option<i64>,
    /// Gemma 3: embeddings times √hidden (in the weights' dtype, as transformers does).
    embed_scale: Option<f64>,
    /// Gemma 3: logits squashed as cap · tanh(logits / cap).
    final_softcap: Option<f64>,
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
                // As transformers builds it: the pad token's row gets no gradient.
                padding_idx: cfg
                    .pad_token_id
                    .filter(|&p| (0..cfg.vocab_size).contains(&p))
                    .unwrap_or(-1),
                ..Default::default()
            },
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model / "layers" / i, cfg, i as usize))
            .collect();
        let gemma = cfg.gemma.as_ref();
        let norm = RmsNorm::new(
            &model / "norm",
            cfg.hidden_size,
            cfg.rms_norm_eps,
            gemma.is_some(),
        );
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
            local_inv_freq: rope::local_inv_freq(cfg, vs.device()),
            vocab_size: cfg.vocab_size,
            sliding_window: cfg.sliding_window,
            embed_scale: gemma.map(|_| (cfg.hidden_size as f64).sqrt()),
            final_softcap: gemma.and_then(|g| g.final_logit_softcapping),
        }
    }

    /// The token embeddings (scaled for Gemma 3).
    fn embed(&self, input_ids: &Tensor) -> Tensor {
        let x = self.embed_tokens.forward(input_ids);
        match self.embed_scale {
            // transformers multiplies by a tensor of √hidden cast to the weights' dtype: the
            // same product as a scalar rounded to that dtype, rounded here on the host (a
            // tensor moved to the device at every forward would be a copy and a sync).
            Some(scale) => {
                let rounded = Tensor::from(scale as f32)
                    .to_kind(x.kind())
                    .double_value(&[]);
                x * rounded
            }
            None => x,
        }
    }

    fn rope_tables(&self, positions: &Tensor) -> RopeTables {
        RopeTables {
            global: rope::tables(positions, &self.inv_freq),
            local: self
                .local_inv_freq
                .as_ref()
                .map(|f| rope::tables(positions, f)),
        }
    }

    fn packed_masks(&self, p: &Packing) -> PackedMasks {
        let windowed = |yes: bool| {
            self.layers
                .iter()
                .any(|l| l.self_attn.sliding_window.is_some() == yes)
        };
        PackedMasks {
            full: windowed(false).then(|| p.mask(None)),
            windowed: windowed(true).then(|| p.mask(self.sliding_window)),
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
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.matmul(&self.embed_tokens.ws.tr()),
        };
        match self.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
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
        mask: Option<&PackedMasks>,
    ) -> Tensor {
        self.head(&self.hidden_masked(input_ids, positions, mask))
    }

    /// The last decoder layer's output (before the final norm and the head).
    fn hidden_masked(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: Option<&PackedMasks>,
    ) -> Tensor {
        let rope = self.rope_tables(positions);
        let mut x = self.embed(input_ids);
        for layer in &self.layers {
            x = layer.forward(&x, &rope, None, mask);
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
                let masks = self.packed_masks(p);
                self.hidden_masked(input_ids, &p.positions, Some(&masks))
            }
        }
    }

    /// Logits for tokens that follow the ones already in `cache`, which they are appended to.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Tensor {
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let rope = self.rope_tables(&Self::positions(input_ids, cache.len));
        let mut x = self.embed(input_ids);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &rope, Some(slot), None);
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
        let masks = packing.map(|p| self.packed_masks(p));
        let mask = masks.as_ref();
        let rope = self.rope_tables(&positions);
        let mut layer_inputs = Vec::with_capacity(self.layers.len());
        let hidden = tch::no_grad(|| {
            let mut x = self.embed(input_ids);
            for layer in &self.layers {
                let next = layer.forward(&x, &rope, None, mask);
                layer_inputs.push(x);
                x = next;
            }
            x
        });
        let (loss_value, mut upstream) =
            self.head_loss_backward(&hidden, labels, scale, super::loss::CHUNK_ELEMENTS);
        for (layer, input) in self.layers.iter().zip(layer_inputs).rev() {
            let input = input.set_requires_grad(true);
            let out = layer.forward(&input, &rope, None, mask);
            (out * &upstream).sum(Kind::Float).backward();
            upstream = input.grad();
        }
        (self.embed(input_ids) * &upstream)
            .sum(Kind::Float)
            .backward();
        loss_value
    }
}
