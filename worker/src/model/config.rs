//! Hugging Face `config.json` for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2), read
//! the way `transformers` reads it: both the 4.x layout (`rope_theta` + `rope_scaling`,
//! `torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`), with each model type's
//! class defaults for absent fields. Anything the model code does not implement is refused here,
//! by name, before a single weight is read.

use super::dtype::DType;
use super::ModelError;
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's layout with an RMSNorm over each query and key head before RoPE, and no biases
    /// unless `attention_bias`.
    Qwen3,
    /// `gemma3_text`: see [`GemmaOptions`].
    Gemma3,
    /// `gemma2`: Gemma 3's layout without q/k norms and with one RoPE, its attention scores
    /// soft-capped.
    Gemma2,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
            Family::Gemma2 => "gemma2",
        }
    }
}

/// What Gemma 2 and 3 do differently from the Llama family: RMSNorm as `x * (1 + w)` (weights
/// start at zero), embeddings scaled by √hidden, GeGLU with tanh-approximate GELU, norms after
/// attention and before and after the MLP, attention scores scaled by
/// `query_pre_attn_scalar`^-½, sliding-window layers among global ones, soft-capping of the
/// final logits; Gemma 3 adds per-head query and key norms and its sliding layers' own RoPE
/// base, Gemma 2 soft-caps the attention scores.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaOptions {
    pub query_pre_attn_scalar: f64,
    /// Per layer: true for sliding-window attention (`sliding_attention`), false for global.
    pub sliding_layers: Vec<bool>,
    /// Gemma 3's sliding layers' RoPE (`rope_local_base_freq`, or
    /// `rope_parameters.sliding_attention`); None: every layer uses the global one.
    pub local_rope: Option<(f64, RopeScaling)>,
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2: attention scores squashed as cap · tanh(scores / cap) (no SDPA then).
    pub attn_logit_softcapping: Option<f64>,
}

/// How rotary frequencies are rescaled for long context (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    /// Bias on q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm (weights `q_norm`, `k_norm`, head_dim wide) over each query and key head
    /// before the rotary embedding.
    pub qk_norm: bool,
    /// Mistral: each token attends to at most this many tokens (itself included); Gemma 3:
    /// the same in its sliding layers.
    pub sliding_window: Option<i64>,
    pub gemma: Option<GemmaOptions>,
    /// The dtype the checkpoint says its weights are stored in.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The file as read, so a saved checkpoint keeps every field we do not interpret.
    pub raw: Map<String, Value>,
}

/// Typed access to a JSON object's fields with errors that name file and field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: String) -> ModelError {
        ModelError::Config {
            path: self.path.to_string(),
            field: field.to_string(),
            message,
        }
    }

    /// None when absent or null (transformers treats both as "use the default").
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn int(&self, field: &str) -> Result<Option<i64>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected an integer, found {v}"))),
        }
    }

    fn required_int(&self, field: &str) -> Result<i64, ModelError> {
        let v = self.int(field)?.ok_or_else(|| {
            self.err(
                field,
                "required field is missing; is this a Hugging Face causal LM config.json?".into(),
            )
        })?;
        if v <= 0 {
            return Err(self.err(field, format!("must be positive, got {v}")));
        }
        Ok(v)
    }

    fn float(&self, field: &str) -> Result<Option<f64>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn boolean(&self, field: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn string(&self, field: &str) -> Result<Option<&'a str>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    /// A token id field: one integer or a list of them.
    fn ids(&self, field: &str) -> Result<Vec<i64>, ModelError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        self.err(field, format!("expected integer token ids, found {v}"))
                    })
                })
                .collect(),
            Some(v) => v
                .as_i64()
                .map(|id| vec![id])
                .ok_or_else(|| self.err(field, format!("expected a token id, found {v}"))),
        }
    }
}

impl ModelConfig {
    pub fn n_kv_heads(&self) -> i64 {
        self.num_key_value_heads
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
    }

    /// The first end-of-sequence id (HF allows a single id or a list).
    pub fn eos_token_id(&self) -> Option<i64> {
        self.eos_token_ids.first().copied()
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
            path: shown.clone(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: shown.clone(),
            source,
        })?;
        Self::from_json(value, &shown)
    }

    pub fn from_json(value: Value, path: &str) -> Result<Self, ModelError> {
        let Value::Object(raw) = value else {
            return Err(ModelError::Config {
                path: path.into(),
                field: "(top level)".into(),
                message: "expected a JSON object".into(),
            });
        };
        let f = Fields { map: &raw, path };
        let family = match f.string("model_type")?.unwrap_or("llama") {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3_text" => Family::Gemma3,
            "gemma2" => Family::Gemma2,
            other => {
                return Err(f.err(
                    "model_type",
                    format!(
                        "`{other}` is not supported; supported: llama, mistral, qwen2, qwen3, \
                         gemma2, gemma3_text"
                    ),
                ))
            }
        };
        let hidden_size = f.required_int("hidden_size")?;
        let num_attention_heads = f.required_int("num_attention_heads")?;
        let num_key_value_heads = f.int("num_key_value_heads")?.unwrap_or(num_attention_heads);
        // Qwen3Config's class default is 128, Gemma3TextConfig's 256, not hidden_size / heads.
        let head_dim = f.int("head_dim")?.unwrap_or(match family {
            Family::Qwen3 => 128,
            Family::Gemma3 | Family::Gemma2 => 256,
            _ => hidden_size / num_attention_heads,
        });
        if num_key_value_heads <= 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} must be positive and divide num_attention_heads \
                     ({num_attention_heads})"
                ),
            ));
        }
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                format!("rotary embeddings need a positive even head_dim, got {head_dim}"),
            ));
        }
        let (act_field, want) = match family {
            Family::Gemma3 | Family::Gemma2 => ("hidden_activation", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu"),
        };
        if let Some(act) = f.string(act_field)? {
            if act != want {
                return Err(f.err(
                    act_field,
                    format!(
                        "`{act}` is not supported; {} uses {want}",
                        family.model_type()
                    ),
                ));
            }
        }
        if let Some(p) = f.float("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(f.err("partial_rotary_factor", "only 1.0 is supported".into()));
            }
        }
        let gemma = match family {
            Family::Gemma3 | Family::Gemma2 => Some(gemma_options(
                &f,
                family,
                f.required_int("num_hidden_layers")?,
            )?),
            _ => None,
        };
        let (rope_theta, rope_scaling) = match family {
            Family::Gemma3 => gemma_global_rope(&f)?,
            _ => rope(&f)?,
        };
        let attention_bias = f.boolean("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (
                attention_bias,
                attention_bias,
                f.boolean("mlp_bias", false)?,
            ),
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 | Family::Gemma3 | Family::Gemma2 => {
                (attention_bias, attention_bias, false)
            }
            Family::Mistral => (false, false, false),
        };
        let sliding_window = match family {
            // MistralConfig's class default is 4096; `null` turns it off.
            Family::Mistral => match raw.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(_) => f.int("sliding_window")?,
            },
            Family::Qwen2 | Family::Qwen3 => {
                let layer_types_sliding = raw
                    .get("layer_types")
                    .and_then(Value::as_array)
                    .is_some_and(|t| t.iter().any(|v| v != "full_attention"));
                if f.boolean("use_sliding_window", false)? || layer_types_sliding {
                    return Err(f.err(
                        "use_sliding_window",
                        format!(
                            "{}'s per-layer sliding-window attention is not supported; set it \
                             to false",
                            family.model_type()
                        ),
                    ));
                }
                None
            }
            Family::Llama => None,
            // Gemma3TextConfig's class default is 4096.
            // Both Gemma configs' class default is 4096.
            Family::Gemma3 | Family::Gemma2 => Some(f.int("sliding_window")?.unwrap_or(4096)),
        };
        if let Some(w) = sliding_window {
            if w <= 0 {
                return Err(f.err("sliding_window", format!("must be positive, got {w}")));
            }
        }
        let dtype = match f.string("dtype")?.or(f.string("torch_dtype")?) {
            None => None,
            Some(name) => Some(DType::from_hf_name(name).ok_or_else(|| {
                f.err(
                    if raw.contains_key("dtype") {
                        "dtype"
                    } else {
                        "torch_dtype"
                    },
                    format!("unknown dtype `{name}`; expected float32, bfloat16 or float16"),
                )
            })?),
        };
        let config = ModelConfig {
            family,
            vocab_size: f.required_int("vocab_size")?,
            hidden_size,
            intermediate_size: f.required_int("intermediate_size")?,
            num_hidden_layers: f.required_int("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.float("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.int("max_position_embeddings")?.unwrap_or(2048),
            // Gemma 3 ties its head to the embeddings unless told otherwise.
            tie_word_embeddings: f.boolean(
                "tie_word_embeddings",
                matches!(family, Family::Gemma3 | Family::Gemma2),
            )?,
            initializer_range: f.float("initializer_range")?.unwrap_or(0.02),
            qkv_bias,
            o_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            mlp_bias,
            sliding_window,
            gemma,
            dtype,
            bos_token_id: f.ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.ids("eos_token_id")?,
            pad_token_id: f.ids("pad_token_id")?.first().copied(),
            raw: raw.clone(),
        };
        Ok(config)
    }

    /// config.json for a checkpoint whose weights are stored as `dtype`: the original fields
    /// with the dtype updated under both the 4.x and 5.x names.
    pub fn to_json_with_dtype(&self, dtype: DType) -> Value {
        let mut raw = self.raw.clone();
        raw.insert("torch_dtype".into(), Value::from(dtype.hf_name()));
        raw.insert("dtype".into(), Value::from(dtype.hf_name()));
        Value::Object(raw)
    }
}

/// A soft-capping field: absent is the class default, null is none.
fn softcap(f: &Fields, field: &str, default: Option<f64>) -> Result<Option<f64>, ModelError> {
    match f.map.get(field) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(_) => f.float(field),
    }
}

/// Gemma's options: layer types from `layer_types`, or every `sliding_window_pattern`-th
/// layer global (transformers' derivation: 6 for Gemma 3, every second for Gemma 2); Gemma 3's
/// local RoPE from `rope_parameters.sliding_attention` (transformers 5) or
/// `rope_local_base_freq` (4).
fn gemma_options(f: &Fields, family: Family, layers: i64) -> Result<GemmaOptions, ModelError> {
    let gemma2 = family == Family::Gemma2;
    let attn_logit_softcapping = softcap(f, "attn_logit_softcapping", gemma2.then_some(50.0))?;
    if !gemma2 && attn_logit_softcapping.is_some() {
        return Err(f.err(
            "attn_logit_softcapping",
            "Gemma 3 has no attention soft-capping (null); it is Gemma 2's (model_type gemma2)"
                .into(),
        ));
    }
    if f.boolean("use_bidirectional_attention", false)? {
        return Err(f.err(
            "use_bidirectional_attention",
            "only causal attention is supported (false)".into(),
        ));
    }
    let sliding_layers = match f.get("layer_types") {
        Some(Value::Array(types)) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(f.err(
                    "layer_types",
                    format!("`{t}`: expected sliding_attention or full_attention"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => return Err(f.err("layer_types", format!("expected a list, found {other}"))),
        None => {
            let pattern = f
                .int("sliding_window_pattern")?
                .or(f.int("_sliding_window_pattern")?)
                .unwrap_or(if gemma2 { 2 } else { 6 })
                .max(1);
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    if sliding_layers.len() as i64 != layers {
        return Err(f.err(
            "layer_types",
            format!(
                "{} entries for {layers} layers (num_hidden_layers)",
                sliding_layers.len()
            ),
        ));
    }
    let local_rope = match f.get("rope_parameters") {
        _ if gemma2 => None,
        Some(Value::Object(by_type)) if by_type.contains_key("sliding_attention") => {
            Some(rope_dict(
                f,
                by_type.get("sliding_attention"),
                "rope_parameters.sliding_attention",
                None,
            )?)
        }
        _ => Some((
            f.float("rope_local_base_freq")?.unwrap_or(10000.0),
            RopeScaling::None,
        )),
    };
    Ok(GemmaOptions {
        query_pre_attn_scalar: f.float("query_pre_attn_scalar")?.unwrap_or(256.0),
        sliding_layers,
        local_rope,
        final_logit_softcapping: softcap(f, "final_logit_softcapping", gemma2.then_some(30.0))?,
        attn_logit_softcapping,
    })
}

/// Gemma 3's global layers' RoPE: `rope_parameters.full_attention` (transformers 5), or
/// `rope_theta` (default 1e6) with `rope_scaling` (4).
fn gemma_global_rope(f: &Fields) -> Result<(f64, RopeScaling), ModelError> {
    match f.get("rope_parameters") {
        Some(Value::Object(by_type)) if by_type.contains_key("full_attention") => rope_dict(
            f,
            by_type.get("full_attention"),
            "rope_parameters.full_attention",
            None,
        ),
        _ => {
            let scaling = match f.get("rope_scaling") {
                Some(Value::Object(_)) => f.get("rope_scaling"),
                _ => None,
            };
            let theta = f.float("rope_theta")?.or(Some(1_000_000.0));
            rope_dict(f, scaling, "rope_scaling", theta)
        }
    }
}

/// Reads rope theta and scaling from `rope_parameters` (transformers 5) or from
/// `rope_theta` + `rope_scaling` (transformers 4).
fn rope(f: &Fields) -> Result<(f64, RopeScaling), ModelError> {
    let (params, field) = match f.get("rope_parameters") {
        Some(m @ Value::Object(_)) => (Some(m), "rope_parameters"),
        Some(_) => return Err(f.err("rope_parameters", "expected an object".into())),
        None => match f.get("rope_scaling") {
            Some(m @ Value::Object(_)) => (Some(m), "rope_scaling"),
            Some(_) => return Err(f.err("rope_scaling", "expected an object or null".into())),
            None => (None, "rope_scaling"),
        },
    };
    rope_dict(f, params, field, f.float("rope_theta")?)
}

/// Theta and scaling from one RoPE parameter object (`field` names it in errors); its own
/// `rope_theta` wins over `top_theta`, and 10000 is the default of both.
fn rope_dict(
    f: &Fields,
    params: Option<&Value>,
    field: &str,
    top_theta: Option<f64>,
) -> Result<(f64, RopeScaling), ModelError> {
    let params = match params {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err(f.err(field, "expected an object".into())),
    };
    let Some(params) = params else {
        return Ok((top_theta.unwrap_or(10000.0), RopeScaling::None));
    };
    let p = Fields {
        map: params,
        path: f.path,
    };
    let theta = p.float("rope_theta")?.or(top_theta).unwrap_or(10000.0);
    // 4.x configs used `type` before `rope_type`.
    let kind = p
        .string("rope_type")?
        .or(p.string("type")?)
        .unwrap_or("default");
    let need = |name: &str| -> Result<f64, ModelError> {
        p.float(name)?.ok_or_else(|| {
            f.err(
                &format!("{field}.{name}"),
                format!("required for rope_type `{kind}`"),
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(f.err(
                &format!("{field}.rope_type"),
                format!("`{other}` is not supported; supported: default, linear, llama3"),
            ))
        }
    };
    Ok((theta, scaling))
}
