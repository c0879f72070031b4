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
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
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
    /// Mistral: each token attends to at most this many tokens (itself included).
    pub sliding_window: Option<i64>,
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
            other => {
                return Err(f.err(
                    "model_type",
                    format!("`{other}` is not supported; supported: llama, mistral, qwen2, qwen3"),
                ))
            }
        };
        let hidden_size = f.required_int("hidden_size")?;
        let num_attention_heads = f.required_int("num_attention_heads")?;
        let num_key_value_heads = f.int("num_key_value_heads")?.unwrap_or(num_attention_heads);
        // Qwen3Config's class default is 128, not hidden_size / heads.
        let head_dim = f.int("head_dim")?.unwrap_or(match family {
            Family::Qwen3 => 128,
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
        if let Some(act) = f.string("hidden_act")? {
            if act != "silu" {
                return Err(f.err(
                    "hidden_act",
                    format!("`{act}` is not supported; the Llama family uses silu"),
                ));
            }
        }
        if let Some(p) = f.float("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(f.err("partial_rotary_factor", "only 1.0 is supported".into()));
            }
        }
        let (rope_theta, rope_scaling) = rope(&f)?;
        let attention_bias = f.boolean("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match family {
            Family::Llama => (
                attention_bias,
                attention_bias,
                f.boolean("mlp_bias", false)?,
            ),
            Family::Qwen2 => (true, false, false),
            Family::Qwen3 => (attention_bias, attention_bias, false),
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
            tie_word_embeddings: f.boolean("tie_word_embeddings", false)?,
            initializer_range: f.float("initializer_range")?.unwrap_or(0.02),
            qkv_bias,
            o_bias,
            qk_norm: family == Family::Qwen3,
            mlp_bias,
            sliding_window,
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

/// Reads rope theta and scaling from `rope_parameters` (transformers 5) or from
/// `rope_theta` + `rope_scaling` (transformers 4).
fn rope(f: &Fields) -> Result<(f64, RopeScaling), ModelError> {
    let (params, field) = match f.get("rope_parameters") {
        Some(Value::Object(m)) => (Some(m), "rope_parameters"),
        Some(_) => return Err(f.err("rope_parameters", "expected an object".into())),
        None => match f.get("rope_scaling") {
            Some(Value::Object(m)) => (Some(m), "rope_scaling"),
            Some(_) => return Err(f.err("rope_scaling", "expected an object or null".into())),
            None => (None, "rope_scaling"),
        },
    };
    let top_theta = f.float("rope_theta")?;
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
