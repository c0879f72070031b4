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
    fn from_file(path: &Path) -> Result<Self, DataError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tiny_base() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny/base")
    }

    fn config(json: serde_json::Value) -> ModelConfig {
        let mut base = serde_json::json!({
            "vocab_size": 259, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2
        });
        base.as_object_mut()
            .unwrap()
            .extend(json.as_object().unwrap().clone());
        ModelConfig::from_json(base, "config.json").unwrap()
    }

    /// Copies the tiny tokenizer with the given tokenizer_config.json (None: no such file).
    fn model_dir(tok_config: Option<serde_json::Value>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            tiny_base().join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        if let Some(c) = tok_config {
            std::fs::write(dir.path().join("tokenizer_config.json"), c.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn special_tokens_come_from_tokenizer_config_then_config_json() {
        let ids = serde_json::json!({"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 4});
        // Strings and AddedToken objects are looked up in the vocabulary.
        let dir = model_dir(Some(serde_json::json!({
            "bos_token": "<|bos|>",
            "eos_token": {"content": "<|eos|>", "special": true},
        })));
        let t = Tokenizer::from_model_dir(dir.path(), &config(ids.clone())).unwrap();
        assert_eq!(
            t.special,
            SpecialTokens {
                bos: Some(256),
                eos: Some(257),
                pad: Some(4)
            }
        );
        // Without tokenizer_config.json, config.json's ids (the first of a list) are used.
        let dir = model_dir(None);
        let t = Tokenizer::from_model_dir(dir.path(), &config(ids)).unwrap();
        assert_eq!(
            t.special,
            SpecialTokens {
                bos: Some(1),
                eos: Some(2),
                pad: Some(4)
            }
        );
        // A token the vocabulary does not have is an error naming the field.
        let dir = model_dir(Some(serde_json::json!({"eos_token": "</s>"})));
        let err = Tokenizer::from_model_dir(dir.path(), &config(serde_json::json!({})))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`eos_token`") && err.contains("</s>"), "{err}");
    }
}
