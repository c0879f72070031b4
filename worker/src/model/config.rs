//! Hugging Face `config.json` for Llama-architecture models.

use super::ModelError;
use serde::Deserialize;
use std::path::Path;

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_max_position_embeddings() -> i64 {
    2048
}
fn default_model_type() -> String {
    "llama".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl LlamaConfig {
    pub fn n_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The first end-of-sequence id (HF allows a single id or a list).
    pub fn eos_token_id(&self) -> Option<i64> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_i64(),
            Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_i64()),
            _ => None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
            path: shown.clone(),
            source,
        })?;
        let config: LlamaConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::ConfigJson {
                path: shown.clone(),
                source,
            })?;
        config.validate(&shown)?;
        Ok(config)
    }

    pub fn validate(&self, path: &str) -> Result<(), ModelError> {
        let bad = |field: &'static str, message: String| ModelError::Unsupported {
            path: path.to_string(),
            field,
            message,
        };
        if self.model_type != "llama" {
            return Err(bad(
                "model_type",
                format!(
                    "`{}` is not supported yet; supported: llama",
                    self.model_type
                ),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.n_kv_heads()),
            ("head_dim", self.head_dim()),
        ] {
            if v <= 0 {
                return Err(bad(field, format!("must be positive, got {v}")));
            }
        }
        if self.num_attention_heads % self.n_kv_heads() != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads ({})",
                    self.n_kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(bad(
                "head_dim",
                format!(
                    "rotary embeddings need an even head_dim, got {}",
                    self.head_dim()
                ),
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad(
                "rope_scaling",
                "rope scaling is not supported yet; remove it or use a model without it".into(),
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err(bad(
                "attention_bias",
                "bias in attention or MLP projections is not supported yet".into(),
            ));
        }
        Ok(())
    }
}
