//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, with the special
//! tokens resolved as transformers resolves them: tokenizer_config.json's `bos_token` /
//! `eos_token` / `pad_token` (a string or an AddedToken object) looked up in the vocabulary,
//! falling back to config.json's `*_token_id`.

use crate::data::DataError;
use crate::model::ModelConfig;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub special: SpecialTokens,
}

fn token_text(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            special: SpecialTokens::default(),
        })
    }

    /// tokenizer.json of a model directory, with its special tokens.
    pub fn from_model_dir(dir: &Path, config: &ModelConfig) -> Result<Self, DataError> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let tok_config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
                path: config_path.display().to_string(),
                message: format!("invalid JSON: {e}"),
            })?,
            Err(_) => Value::Null,
        };
        let lookup = |field: &str, fallback: Option<i64>| -> Result<Option<u32>, DataError> {
            match token_text(tok_config.get(field)) {
                Some(text) => tokenizer.inner.token_to_id(text).map(Some).ok_or_else(|| {
                    DataError::Tokenizer {
                        path: config_path.display().to_string(),
                        message: format!(
                            "`{field}` is `{text}`, which is not in tokenizer.json's vocabulary"
                        ),
                    }
                }),
                None => Ok(fallback.and_then(|id| u32::try_from(id).ok())),
            }
        };
        tokenizer.special = SpecialTokens {
            bos: lookup("bos_token", config.bos_token_id)?,
            eos: lookup("eos_token", config.eos_token_id())?,
            pad: lookup("pad_token", config.pad_token_id)?,
        };
        Ok(tokenizer)
    }

    /// Token ids of `text`; `add_special_tokens` applies tokenizer.json's post-processor (a BOS
    /// token for Llama 3), as `tokenizer(text)` does in transformers.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Token ids of `text` alone, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode_with(text, false)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| e.to_string())
    }
}
