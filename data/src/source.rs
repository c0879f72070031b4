//! Dataset files as a stream of JSON records, one per line of a JSON Lines file or per row of a
//! Parquet file. A Parquet row becomes the JSON object its columns spell (a `messages` column of
//! list<struct<role, content>> becomes the chat list), so one parser, one set of checks and one
//! error wording serve both; in messages, "line N" of a Parquet file is its N-th row.
//!
//! Parquet is read through the `parquet` crate's row reader: one row group's column chunks in
//! memory at a time, whatever the file size.

use crate::DataError;
use parquet::file::reader::SerializedFileReader;
use parquet::record::reader::RowIter;
use std::io::BufRead;
use std::path::Path;

/// Compression codecs this build reads, for the message when a file uses another.
const CODECS: &str = "snappy, zstd, gzip, lz4 or none";

enum Inner {
    Lines(std::io::BufReader<std::fs::File>),
    Parquet(RowIter<'static>),
}

pub struct Records {
    inner: Inner,
    shown: String,
    /// No record read yet: a UTF-8 byte-order mark before it is dropped.
    at_start: bool,
}

/// What PowerShell, Excel and Notepad write at the start of a "UTF-8" file; Python reads it
/// away with `encoding="utf-8-sig"`, and so does this.
const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// Whether a path names a Parquet file (by its extension, as pandas and `datasets` write them).
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq"))
}

impl Records {
    pub fn open(path: &Path) -> Result<Records, DataError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| DataError::Read {
            path: shown.clone(),
            source,
        })?;
        let inner = if is_parquet(path) {
            let reader = SerializedFileReader::new(file).map_err(|e| parquet_error(&shown, e))?;
            Inner::Parquet(reader.into_iter())
        } else {
            Inner::Lines(std::io::BufReader::with_capacity(1 << 20, file))
        };
        Ok(Records {
            inner,
            shown,
            at_start: true,
        })
    }

    /// The next record's bytes (a JSON object, or whatever the line holds), None at the end.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, DataError> {
        match &mut self.inner {
            Inner::Lines(reader) => {
                let mut bytes = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut bytes)
                    .map_err(|source| DataError::Read {
                        path: self.shown.clone(),
                        source,
                    })?;
                if std::mem::take(&mut self.at_start) && bytes.starts_with(BYTE_ORDER_MARK) {
                    bytes.drain(..BYTE_ORDER_MARK.len());
                }
                Ok((n > 0).then_some(bytes))
            }
            Inner::Parquet(rows) => match rows.next() {
                None => Ok(None),
                Some(Ok(row)) => Ok(Some(row.to_json_value().to_string().into_bytes())),
                Some(Err(e)) => Err(parquet_error(&self.shown, e)),
            },
        }
    }

    /// Fills `chunk` with up to `n` records; empty at the end.
    pub fn next_chunk(&mut self, chunk: &mut Vec<Vec<u8>>, n: usize) -> Result<(), DataError> {
        chunk.clear();
        while chunk.len() < n {
            match self.next_record()? {
                Some(bytes) => chunk.push(bytes),
                None => break,
            }
        }
        Ok(())
    }

    /// The first non-blank record, as text (None when there is none or it is not UTF-8).
    pub fn first(path: &Path) -> Result<Option<String>, DataError> {
        let mut records = Records::open(path)?;
        while let Some(bytes) = records.next_record()? {
            let Ok(text) = String::from_utf8(bytes) else {
                return Ok(None);
            };
            if !text.trim().is_empty() {
                return Ok(Some(text));
            }
        }
        Ok(None)
    }
}

fn parquet_error(shown: &str, e: parquet::errors::ParquetError) -> DataError {
    let text = e.to_string();
    let message = if text.contains("Disabled feature") || text.contains("codec") {
        format!("{text}; ferrotune reads Parquet compressed with {CODECS}: re-save the file with one of them (pandas: `df.to_parquet(path, compression=\"zstd\")`)")
    } else {
        format!("not a readable Parquet file: {text}")
    };
    DataError::Parquet {
        path: shown.to_string(),
        message,
    }
}
