//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, with the special
//! tokens resolved as transformers resolves them: tokenizer_config.json's `bos_token` /
//! `eos_token` / `pad_token` (a string or an AddedToken object) looked up in the vocabulary,
//! falling back to config.json's `*_token_id` (the first of a list).

use crate::DataError;
use serde_json::Value;
use std::ops::Range;
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
    /// tokenizer_config.json (Null when the model has none): chat_template lives there.
    pub config: Value,
}

fn token_text(value: Option<&Value>) -> Option<&str> {
    match value? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value, DataError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
            path: path.display().to_string(),
            message: format!("invalid JSON: {e}"),
        }),
        Err(_) => Ok(Value::Null),
    }
}

/// config.json's `<field>`: a number, or a list whose first entry is used (eos in Llama 3.1).
fn config_id(config: &Value, field: &str) -> Option<u32> {
    let v = config.get(field)?;
    let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
    v.as_u64().and_then(|id| u32::try_from(id).ok())
}

/// config.json's vocabulary size (transformers 5 nests a text model's under `text_config`).
fn model_vocab_size(config: &Value) -> Option<u64> {
    config
        .get("vocab_size")
        .or_else(|| config.get("text_config")?.get("vocab_size"))
        .and_then(Value::as_u64)
}

/// Every id the tokenizer can produce must have a row in the model's embedding; an added
/// special token beyond `vocab_size` would otherwise fail deep inside the first forward.
fn check_vocab_fits(
    inner: &tokenizers::Tokenizer,
    model_config: &Value,
    dir: &Path,
) -> Result<(), DataError> {
    let Some(vocab_size) = model_vocab_size(model_config) else {
        return Ok(());
    };
    let vocab = inner.get_vocab(true);
    let Some((token, max_id)) = vocab.iter().max_by_key(|(_, id)| **id) else {
        return Ok(());
    };
    if u64::from(*max_id) < vocab_size {
        return Ok(());
    }
    let beyond = vocab
        .values()
        .filter(|id| u64::from(**id) >= vocab_size)
        .count();
    Err(DataError::Tokenizer {
        path: dir.join("tokenizer.json").display().to_string(),
        message: format!(
            "token ids go up to {max_id} (`{token}`; {beyond} ids in all are >= {vocab_size}), \
             but {}'s vocab_size is {vocab_size}, so the model has no embedding for them; \
             resize the model's embeddings to at least {} (transformers: \
             model.resize_token_embeddings) and save it, or use the tokenizer the model came with",
            dir.join("config.json").display(),
            u64::from(*max_id) + 1
        ),
    })
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
            config: Value::Null,
        })
    }

    /// tokenizer.json of a model directory, with its special tokens.
    pub fn from_model_dir(dir: &Path) -> Result<Self, DataError> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let tok_config = read_json(&config_path)?;
        let model_config = read_json(&dir.join("config.json"))?;
        let lookup = |field: &str| -> Result<Option<u32>, DataError> {
            match token_text(tok_config.get(field)) {
                Some(text) => tokenizer.inner.token_to_id(text).map(Some).ok_or_else(|| {
                    DataError::Tokenizer {
                        path: config_path.display().to_string(),
                        message: format!(
                            "`{field}` is `{text}`, which is not in tokenizer.json's vocabulary"
                        ),
                    }
                }),
                None => Ok(config_id(&model_config, &format!("{field}_id"))),
            }
        };
        check_vocab_fits(&tokenizer.inner, &model_config, dir)?;
        tokenizer.special = SpecialTokens {
            bos: lookup("bos_token")?,
            eos: lookup("eos_token")?,
            pad: lookup("pad_token")?,
        };
        tokenizer.config = tok_config;
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

    /// Token ids of `text` (no special tokens added) with the byte range each one came from.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, Range<usize>)>, String> {
        let encoding = self.inner.encode(text, false).map_err(|e| e.to_string())?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, end))| (id, start..end))
            .collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| e.to_string())
    }

    /// Decodes keeping special tokens (what a template wrote), for tests and reports.
    pub fn decode_all(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, false).map_err(|e| e.to_string())
    }

    /// The text of a token id (special tokens included), as templates see `bos_token`.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tiny_base() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny/base")
    }

    /// Copies the tiny tokenizer with the given config.json and tokenizer_config.json (None: no
    /// such file).
    fn model_dir(config: Value, tok_config: Option<Value>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            tiny_base().join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        if let Some(c) = tok_config {
            std::fs::write(dir.path().join("tokenizer_config.json"), c.to_string()).unwrap();
        }
        dir
    }

    #[test]
    fn special_tokens_come_from_tokenizer_config_then_config_json() {
        let ids = serde_json::json!({"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 4});
        // Strings and AddedToken objects are looked up in the vocabulary.
        let dir = model_dir(
            ids.clone(),
            Some(serde_json::json!({
                "bos_token": "<|bos|>",
                "eos_token": {"content": "<|eos|>", "special": true},
            })),
        );
        let t = Tokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(
            t.special,
            SpecialTokens {
                bos: Some(256),
                eos: Some(257),
                pad: Some(4)
            }
        );
        assert_eq!(t.token_text(257).as_deref(), Some("<|eos|>"));
        // Without tokenizer_config.json, config.json's ids (the first of a list) are used.
        let dir = model_dir(ids, None);
        let t = Tokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(
            t.special,
            SpecialTokens {
                bos: Some(1),
                eos: Some(2),
                pad: Some(4)
            }
        );
        // A token the vocabulary does not have is an error naming the field.
        let dir = model_dir(
            serde_json::json!({}),
            Some(serde_json::json!({"eos_token": "</s>"})),
        );
        let err = Tokenizer::from_model_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`eos_token`") && err.contains("</s>"), "{err}");
    }

    #[test]
    fn ids_beyond_the_models_vocab_size_are_refused_naming_both_numbers() {
        let fits = model_dir(serde_json::json!({"vocab_size": 512}), None);
        let t = Tokenizer::from_model_dir(fits.path()).unwrap();
        let max_id = (0..512)
            .rev()
            .find(|id| t.token_text(*id).is_some())
            .unwrap();
        // Exactly one id short: the highest id has no embedding row.
        let short = model_dir(serde_json::json!({"vocab_size": max_id}), None);
        let err = Tokenizer::from_model_dir(short.path())
            .err()
            .expect("a tokenizer with ids beyond vocab_size")
            .to_string();
        assert!(
            err.contains(&format!("go up to {max_id}"))
                && err.contains(&format!("vocab_size is {max_id}"))
                && err.contains("resize_token_embeddings"),
            "{err}"
        );
        // transformers 5 nests a text model's vocabulary size.
        let nested = model_dir(
            serde_json::json!({"text_config": {"vocab_size": max_id}}),
            None,
        );
        assert!(Tokenizer::from_model_dir(nested.path()).is_err());
    }

    #[test]
    fn offsets_cover_the_text_token_by_token() {
        let dir = model_dir(serde_json::json!({}), None);
        let t = Tokenizer::from_model_dir(dir.path()).unwrap();
        let text = "ab <|eos|>c";
        let pieces = t.encode_with_offsets(text).unwrap();
        let ids: Vec<u32> = pieces.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, t.encode(text).unwrap());
        let eos = pieces.iter().find(|(id, _)| *id == 257).unwrap();
        assert_eq!(&text[eos.1.clone()], "<|eos|>");
    }
}
