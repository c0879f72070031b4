//! One streaming pass over a dataset file (JSON Lines, or Parquet rows as JSON: see `source`):
//! parse and check every line, encode, pack into a sink (the cache, or nothing when only
//! validating) and gather the summary that `coordinator validate` prints. Memory stays bounded
//! whatever the file size: a chunk of lines at a time, a length histogram, and 12 bytes per
//! distinct line for exact-duplicate detection.

use crate::cache::{digest_parts, ensure, file_digest, Outcome as Built, TokenCache};
use crate::chat::ChatTemplate;
use crate::encode::Encoder;
use crate::pack::{PackOptions, PackStats, Packer, Placed, SequenceSink};
use crate::record::{self, Format};
use crate::source::Records;
use crate::{DataError, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::Path;

/// Located problems kept per dataset for printing; the counts are always exact.
pub const MAX_SHOWN: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineIssue {
    pub line: u64,
    pub severity: Severity,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lengths {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub name: String,
    pub path: String,
    pub format: Format,
    pub lines: u64,
    pub samples: u64,
    pub errors: u64,
    pub warnings: u64,
    pub duplicates: u64,
    pub overlong: u64,
    /// Tokens per valid sample, before truncation or splitting.
    pub lengths: Lengths,
    pub pack: PackStats,
    pub issues: Vec<LineIssue>,
}

/// Everything the cached content depends on, hashed into the cache key.
pub struct Recipe<'a> {
    pub data: &'a Path,
    pub format: Format,
    pub tokenizer_dir: &'a Path,
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub train_on_inputs: bool,
    pub pack: PackOptions,
}

impl Recipe<'_> {
    pub fn key(&self) -> Result<String, DataError> {
        let data = file_digest(self.data)?;
        let tokenizer = file_digest(&self.tokenizer_dir.join("tokenizer.json"))?;
        let s = self.tokenizer.special;
        // Only when set: the keys of caches built without kwargs stay what they were.
        let kwargs = self
            .template
            .map(|t| t.kwargs())
            .filter(|k| !k.is_empty())
            .map(|k| serde_json::Value::Object(k.clone()).to_string());
        let mut parts: Vec<(&str, String)> = vec![
            ("version", crate::cache::FORMAT_VERSION.to_string()),
            ("data", data),
            ("tokenizer", tokenizer),
            ("special", format!("{:?} {:?} {:?}", s.bos, s.eos, s.pad)),
            (
                "template",
                self.template
                    .map(ChatTemplate::source)
                    .unwrap_or("")
                    .to_string(),
            ),
            ("format", self.format.name().to_string()),
            ("train_on_inputs", self.train_on_inputs.to_string()),
            ("seq_len", self.pack.seq_len.to_string()),
            ("packing", self.pack.packing.to_string()),
            ("overlong", self.pack.overlong.name().to_string()),
        ];
        if let Some(k) = kwargs {
            parts.push(("template kwargs", k));
        }
        let parts: Vec<(&str, &str)> = parts.iter().map(|(l, v)| (*l, v.as_str())).collect();
        Ok(digest_parts(&parts))
    }

    fn encoder(&self) -> Encoder<'_> {
        Encoder {
            tokenizer: self.tokenizer,
            template: self.template,
            train_on_inputs: self.train_on_inputs,
        }
    }
}

fn percentile(hist: &BTreeMap<u64, u64>, total: u64, q: f64) -> u64 {
    // Nearest rank: the smallest length with at least q of the samples at or below it.
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (&len, &count) in hist {
        seen += count;
        if seen >= rank {
            return len;
        }
    }
    0
}

/// Lines read, parsed and tokenized together (bounded memory: one chunk of lines at a time).
const CHUNK_LINES: usize = 1024;

enum Outcome {
    Blank,
    Bad(String),
    Parsed {
        hash: u64,
        encoded: Result<crate::encode::Encoded, String>,
    },
}

fn read_line(bytes: &[u8], format: Format, encoder: &Encoder) -> Outcome {
    let Ok(line) = std::str::from_utf8(bytes) else {
        return Outcome::Bad("not valid UTF-8".into());
    };
    if line.trim().is_empty() {
        return Outcome::Blank;
    }
    match record::parse(line, format) {
        Err(message) => Outcome::Bad(message),
        Ok(record) => Outcome::Parsed {
            hash: line_hash(line),
            encoded: encoder.encode(&record),
        },
    }
}

fn line_hash(line: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    line.trim().hash(&mut h);
    h.finish()
}

/// Reads `recipe.data` line by line into `sink`; IO failures are errors, bad lines are counted
/// and reported.
pub fn prepare(
    name: &str,
    recipe: &Recipe,
    sink: &mut dyn SequenceSink,
) -> Result<Report, DataError> {
    let path = recipe.data;
    let shown = path.display().to_string();
    let mut records = Records::open(path)?;
    let encoder = recipe.encoder();
    let mut packer = Packer::new(recipe.pack);
    let mut report = Report {
        name: name.to_string(),
        path: shown.clone(),
        format: recipe.format,
        lines: 0,
        samples: 0,
        errors: 0,
        warnings: 0,
        duplicates: 0,
        overlong: 0,
        lengths: Lengths::default(),
        pack: PackStats::default(),
        issues: Vec::new(),
    };
    let note = |report: &mut Report, line: u64, severity: Severity, message: String| {
        match severity {
            Severity::Error => report.errors += 1,
            Severity::Warning => report.warnings += 1,
        }
        if report.issues.len() < MAX_SHOWN {
            report.issues.push(LineIssue {
                line,
                severity,
                message,
            });
        }
    };
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut hist: BTreeMap<u64, u64> = BTreeMap::new();
    let splittable = recipe.format == Format::Text;
    let limit = recipe.pack.seq_len + 1;
    // Lines are parsed and tokenized in parallel a chunk at a time, then counted, checked for
    // duplicates and packed in file order: the cache does not depend on the thread count.
    let mut chunk: Vec<Vec<u8>> = Vec::with_capacity(CHUNK_LINES);
    loop {
        records.next_chunk(&mut chunk, CHUNK_LINES)?;
        if chunk.is_empty() {
            break;
        }
        let outcomes: Vec<Outcome> = chunk
            .par_iter()
            .map(|bytes| read_line(bytes, recipe.format, &encoder))
            .collect();
        for outcome in outcomes {
            report.lines += 1;
            let n = report.lines;
            let (hash, encoded) = match outcome {
                Outcome::Blank => continue,
                Outcome::Bad(message) => {
                    note(&mut report, n, Severity::Error, message);
                    continue;
                }
                Outcome::Parsed { hash, encoded } => (hash, encoded),
            };
            if let Some(first) = seen.insert(hash, n as u32) {
                report.duplicates += 1;
                note(
                    &mut report,
                    n,
                    Severity::Warning,
                    format!("exact duplicate of line {first}"),
                );
                seen.insert(hash, first);
            }
            let encoded = match encoded {
                Ok(e) => e,
                Err(message) => {
                    note(&mut report, n, Severity::Error, message);
                    continue;
                }
            };
            report.samples += 1;
            *hist.entry(encoded.tokens.len() as u64).or_default() += 1;
            match packer.add(&encoded, splittable, sink)? {
                Placed::Whole | Placed::Split => {}
                placed => {
                    let what = if placed == Placed::Truncated {
                        "truncated"
                    } else {
                        "dropped"
                    };
                    report.overlong += 1;
                    let message = if encoded.tokens.len() > limit {
                        format!("{} tokens, longer than data.seq_len + 1 = {limit}; {what} (data.overlong)", encoded.tokens.len())
                    } else {
                        "no token to learn from after encoding; dropped".to_string()
                    };
                    note(&mut report, n, Severity::Warning, message);
                }
            }
        }
    }
    packer.finish(sink)?;
    report.pack = packer.stats;
    if report.pack.sequences == 0 {
        report.errors += 1;
        report.issues.push(LineIssue {
            line: 0,
            severity: Severity::Error,
            message: "no usable sample: nothing to train or evaluate on".into(),
        });
    }
    let total = report.samples;
    report.lengths = Lengths {
        p50: percentile(&hist, total, 0.5),
        p90: percentile(&hist, total, 0.9),
        p99: percentile(&hist, total, 0.99),
        max: hist.keys().next_back().copied().unwrap_or(0),
    };
    Ok(report)
}

/// A dataset's cache, opened or built, or the report of why it cannot be built.
pub enum Prepared {
    Ready {
        cache: TokenCache,
        report: Box<Report>,
        outcome: Built,
    },
    Rejected(Box<Report>),
}

/// Opens the cache of `recipe` under `root`, building it (validating every line) if nobody has.
/// A dataset with errors is never cached.
pub fn cached(name: &str, recipe: &Recipe, root: &Path) -> Result<Prepared, DataError> {
    let key = recipe.key()?;
    let mut rejected = None;
    let result = ensure(root, name, &key, |writer| {
        let report = prepare(name, recipe, writer)?;
        if report.errors > 0 {
            let message = format!("{}: {} errors", report.path, report.errors);
            rejected = Some(report);
            return Err(DataError::Rejected(message));
        }
        Ok(serde_json::to_value(&report).expect("reports serialise"))
    });
    match (result, rejected) {
        (_, Some(report)) => Ok(Prepared::Rejected(Box::new(report))),
        (Ok((cache, outcome)), None) => {
            let report = serde_json::from_value(cache.meta.report.clone()).map_err(|e| {
                DataError::Cache {
                    path: cache.dir.display().to_string(),
                    message: format!(
                        "meta.json report unreadable ({e}); delete the directory to rebuild it"
                    ),
                }
            })?;
            Ok(Prepared::Ready {
                cache,
                report: Box::new(report),
                outcome,
            })
        }
        (Err(e), None) => Err(e),
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for issue in &self.issues {
            let kind = match issue.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            match issue.line {
                0 => writeln!(f, "{}: {kind}: {}", self.path, issue.message)?,
                n => writeln!(f, "{}:{n}: {kind}: {}", self.path, issue.message)?,
            }
        }
        let hidden = (self.errors + self.warnings) as usize - self.issues.len();
        if hidden > 0 {
            writeln!(f, "{}: ... and {hidden} more", self.path)?;
        }
        let l = &self.lengths;
        let p = &self.pack;
        writeln!(
            f,
            "dataset {} ({}, {}): {} samples from {} lines; tokens per sample p50 {} p90 {} p99 {} max {}",
            self.name, self.format.name(), self.path, self.samples, self.lines, l.p50, l.p90, l.p99, l.max
        )?;
        write!(
            f,
            "  {} sequences, {} learned tokens, {} split documents, {} over-long ({} truncated, {} dropped), {} exact duplicates, {} errors, {} warnings",
            p.sequences, p.target_tokens, p.split, self.overlong, p.truncated, p.dropped, self.duplicates, self.errors, self.warnings
        )
    }
}

#[cfg(test)]
#[path = "prepare_tests.rs"]
mod tests;
