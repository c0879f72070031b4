//! Continued pre-training data: JSON Lines of `{"text": ...}`, tokenized into one stream with an
//! end-of-sequence token after each document, cut into windows of seq_len + 1 tokens (inputs
//! and their next-token labels).

use super::DataError;
use crate::tokenizer::Tokenizer;
use std::io::BufRead;
use std::path::Path;
use tch::{Device, Tensor};

/// Reads the `text` field of every line. Blank lines are skipped; anything else that is not a
/// JSON object with a string `text` is an error naming the file and line.
pub fn read_jsonl_texts(path: &Path) -> Result<Vec<String>, DataError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| DataError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut texts = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| DataError::Read {
            path: shown.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::Line {
            path: shown.clone(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => texts.push(s.clone()),
            Some(_) => return Err(bad("field `text` must be a string".into())),
            None => return Err(bad("expected an object with a string field `text`".into())),
        }
    }
    Ok(texts)
}

/// Non-overlapping windows over one token stream.
pub struct TokenWindows {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl TokenWindows {
    pub fn from_texts(
        texts: &[String],
        tokenizer: &Tokenizer,
        eos: Option<u32>,
        seq_len: usize,
    ) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for text in texts {
            tokens.extend(tokenizer.encode(text)?);
            tokens.extend(eos);
        }
        Ok(TokenWindows { tokens, seq_len })
    }

    pub fn from_tokens(tokens: Vec<u32>, seq_len: usize) -> Self {
        TokenWindows { tokens, seq_len }
    }

    /// Number of complete windows; a window needs seq_len + 1 tokens (the last label).
    pub fn len(&self) -> usize {
        if self.tokens.len() <= self.seq_len {
            0
        } else {
            (self.tokens.len() - 1) / self.seq_len
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn total_tokens(&self) -> usize {
        self.tokens.len()
    }

    fn window(&self, i: usize) -> &[u32] {
        let start = i * self.seq_len;
        &self.tokens[start..start + self.seq_len + 1]
    }

    /// (input_ids, labels), both (batch, seq_len) int64, for the given window indices.
    pub fn batch(&self, indices: &[usize], device: Device) -> (Tensor, Tensor) {
        let s = self.seq_len;
        let mut inputs = Vec::with_capacity(indices.len() * s);
        let mut labels = Vec::with_capacity(indices.len() * s);
        for &i in indices {
            let w = self.window(i);
            inputs.extend(w[..s].iter().map(|&t| t as i64));
            labels.extend(w[1..].iter().map(|&t| t as i64));
        }
        let shape = [indices.len() as i64, s as i64];
        (
            Tensor::from_slice(&inputs).view(shape).to_device(device),
            Tensor::from_slice(&labels).view(shape).to_device(device),
        )
    }
}
