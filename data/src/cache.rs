//! The tokenized cache: a dataset tokenized and packed once per recipe, in shared storage.
//!
//! `<root>/<name>-<key>/` holds `tokens.bin` (u32), `targets.bin` (u8: is the token learned),
//! `samples.bin` (u64 token offsets, one more than samples), `sequences.bin` (u64 sample offsets,
//! one more than sequences) and `meta.json` (counts, recipe, the build report). The key hashes
//! everything the content depends on: the data file's bytes, tokenizer.json, the special tokens,
//! the template, the format and the packing options.
//!
//! Building: whoever first creates `<name>-<key>.lock` (O_EXCL) builds into a `.tmp-*` directory
//! and renames it to the final name when every file is written and synced; everyone else waits
//! for that name to appear. A directory under the final name is therefore always complete, and a
//! crashed builder leaves only a `.tmp-*` directory and a lock that stops being touched: after
//! [`STALE_LOCK`] a waiter removes the lock and builds itself.

use crate::DataError;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

#[cfg(not(target_endian = "little"))]
compile_error!("the token cache is read by casting little-endian files in place");

/// Bumped whenever the layout or the way samples are encoded changes.
pub const FORMAT_VERSION: u32 = 1;
/// A lock not touched for this long belongs to a builder that died.
pub const STALE_LOCK: Duration = Duration::from_secs(60);
const TOUCH_EVERY: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Cache {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// SHA-256 of a file's bytes, streamed.
pub fn file_digest(path: &Path) -> Result<String, DataError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Hex SHA-256 of labelled parts, each length-prefixed so that no two lists collide.
pub fn digest_parts(parts: &[(&str, &str)]) -> String {
    let mut hasher = Sha256::new();
    for (label, value) in parts {
        for s in [label, value] {
            hasher.update((s.len() as u64).to_le_bytes());
            hasher.update(s.as_bytes());
        }
    }
    format!("{:x}", hasher.finalize())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    pub key: String,
    pub tokens: u64,
    pub samples: u64,
    pub sequences: u64,
    /// What the builder reported (the dataset's validation summary).
    pub report: serde_json::Value,
}

/// Writes a cache directory; dropped before [`CacheWriter::commit`], it removes what it wrote.
pub struct CacheWriter {
    dir: PathBuf,
    lock: Option<PathBuf>,
    tokens: BufWriter<File>,
    targets: BufWriter<File>,
    samples: BufWriter<File>,
    sequences: BufWriter<File>,
    n_tokens: u64,
    n_samples: u64,
    n_sequences: u64,
    touched: Instant,
    committed: bool,
}

impl CacheWriter {
    fn create(dir: PathBuf, lock: Option<PathBuf>) -> Result<Self, DataError> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let open = |name: &str| -> Result<BufWriter<File>, DataError> {
            let path = dir.join(name);
            Ok(BufWriter::new(File::create(&path).map_err(io_err(&path))?))
        };
        let mut writer = CacheWriter {
            tokens: open("tokens.bin")?,
            targets: open("targets.bin")?,
            samples: open("samples.bin")?,
            sequences: open("sequences.bin")?,
            dir,
            lock,
            n_tokens: 0,
            n_samples: 0,
            n_sequences: 0,
            touched: Instant::now(),
            committed: false,
        };
        let io = |e| corrupt(&writer.dir, format!("write: {e}"));
        writer.samples.write_all(&0u64.to_le_bytes()).map_err(io)?;
        writer
            .sequences
            .write_all(&0u64.to_le_bytes())
            .map_err(io)?;
        Ok(writer)
    }

    fn write_err(&self, e: std::io::Error) -> DataError {
        corrupt(&self.dir, format!("write: {e}"))
    }

    /// Keeps the lock fresh so that waiters know the builder is alive.
    fn touch(&mut self) {
        if self.touched.elapsed() >= TOUCH_EVERY {
            if let Some(lock) = &self.lock {
                if let Ok(f) = File::options().write(true).open(lock) {
                    let _ = f.set_modified(SystemTime::now());
                }
            }
            self.touched = Instant::now();
        }
    }

    fn commit(
        mut self,
        final_dir: &Path,
        key: &str,
        report: serde_json::Value,
    ) -> Result<(), DataError> {
        for w in [
            &mut self.tokens,
            &mut self.targets,
            &mut self.samples,
            &mut self.sequences,
        ] {
            w.flush()
                .map_err(|e| corrupt(final_dir, format!("write: {e}")))?;
            w.get_ref()
                .sync_all()
                .map_err(|e| corrupt(final_dir, format!("sync: {e}")))?;
        }
        let meta = Meta {
            version: FORMAT_VERSION,
            key: key.to_string(),
            tokens: self.n_tokens,
            samples: self.n_samples,
            sequences: self.n_sequences,
            report,
        };
        let meta_path = self.dir.join("meta.json");
        let text = serde_json::to_string_pretty(&meta).expect("meta serialises");
        std::fs::write(&meta_path, text).map_err(io_err(&meta_path))?;
        File::open(&meta_path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&meta_path))?;
        std::fs::rename(&self.dir, final_dir).map_err(io_err(final_dir))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl crate::pack::SequenceSink for CacheWriter {
    fn sample(&mut self, tokens: &[u32], targets: &[bool]) -> Result<(), DataError> {
        let mut bytes = Vec::with_capacity(tokens.len() * 4);
        for t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        let flags: Vec<u8> = targets.iter().map(|&t| t as u8).collect();
        self.n_tokens += tokens.len() as u64;
        self.n_samples += 1;
        let offset = self.n_tokens.to_le_bytes();
        let result = self
            .tokens
            .write_all(&bytes)
            .and_then(|_| self.targets.write_all(&flags))
            .and_then(|_| self.samples.write_all(&offset));
        result.map_err(|e| self.write_err(e))?;
        self.touch();
        Ok(())
    }

    fn end_sequence(&mut self) -> Result<(), DataError> {
        self.n_sequences += 1;
        let offset = self.n_samples.to_le_bytes();
        self.sequences
            .write_all(&offset)
            .map_err(|e| self.write_err(e))
    }
}

/// A built cache, memory-mapped.
pub struct TokenCache {
    pub dir: PathBuf,
    pub meta: Meta,
    tokens: Mmap,
    targets: Mmap,
    samples: Mmap,
    sequences: Mmap,
}

/// One sample of a sequence: its tokens and learned flags.
pub type SampleView<'a> = (&'a [u32], &'a [u8]);

impl TokenCache {
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| corrupt(&meta_path, format!("unreadable: {e}")))?;
        if meta.version != FORMAT_VERSION {
            return Err(corrupt(dir, format!("cache format {} (this build reads {FORMAT_VERSION}); delete the directory to rebuild it", meta.version)));
        }
        let map = |name: &str, len: u64| -> Result<Mmap, DataError> {
            let path = dir.join(name);
            let file = File::open(&path).map_err(io_err(&path))?;
            let size = file.metadata().map_err(io_err(&path))?.len();
            if size != len {
                return Err(corrupt(&path, format!("is {size} bytes, meta.json says {len}; the cache is damaged, delete {} to rebuild it", dir.display())));
            }
            // SAFETY: the cache is immutable once renamed into place (builders write elsewhere
            // and rename); nothing in this process writes to the mapped files.
            unsafe { Mmap::map(&file) }.map_err(io_err(&path))
        };
        let cache = TokenCache {
            tokens: map("tokens.bin", meta.tokens * 4)?,
            targets: map("targets.bin", meta.tokens)?,
            samples: map("samples.bin", (meta.samples + 1) * 8)?,
            sequences: map("sequences.bin", (meta.sequences + 1) * 8)?,
            dir: dir.to_path_buf(),
            meta,
        };
        let last_sample = *cache.sample_offsets().last().unwrap_or(&0);
        let last_sequence = *cache.sequence_offsets().last().unwrap_or(&0);
        if last_sample != cache.meta.tokens || last_sequence != cache.meta.samples {
            return Err(corrupt(
                dir,
                "offsets disagree with meta.json; delete the directory to rebuild it",
            ));
        }
        Ok(cache)
    }

    fn sample_offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.samples[..])
    }

    fn sequence_offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.sequences[..])
    }

    pub fn len(&self) -> usize {
        self.meta.sequences as usize
    }

    /// `<name>-<key>`: names this content (data bytes and recipe) wherever the cache lives.
    pub fn name(&self) -> String {
        let name = self.dir.file_name().unwrap_or_default();
        name.to_string_lossy().into_owned()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples of sequence `i`, in order.
    pub fn sequence(&self, i: usize) -> Vec<SampleView<'_>> {
        let seq = self.sequence_offsets();
        let offsets = self.sample_offsets();
        let tokens: &[u32] = bytemuck::cast_slice(&self.tokens[..]);
        (seq[i] as usize..seq[i + 1] as usize)
            .map(|s| {
                let (a, b) = (offsets[s] as usize, offsets[s + 1] as usize);
                (&tokens[a..b], &self.targets[a..b])
            })
            .collect()
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The cache existed (or another process built it while we waited).
    Opened,
    Built,
}

/// The cache directory for `name` and `key` under `root`, built by `build` if nobody has yet.
/// `build` fills the writer and returns the report stored in meta.json; an error from it
/// removes everything it wrote.
pub fn ensure<F>(
    root: &Path,
    name: &str,
    key: &str,
    build: F,
) -> Result<(TokenCache, Outcome), DataError>
where
    F: FnOnce(&mut CacheWriter) -> Result<serde_json::Value, DataError>,
{
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let short = &key[..key.len().min(16)];
    let final_dir = root.join(format!("{name}-{short}"));
    let lock = root.join(format!("{name}-{short}.lock"));
    let mut build = Some(build);
    loop {
        if final_dir.join("meta.json").is_file() {
            let cache = TokenCache::open(&final_dir)?;
            if cache.meta.key != key {
                return Err(corrupt(
                    &final_dir,
                    "belongs to another recipe with the same key prefix; delete it",
                ));
            }
            return Ok((cache, Outcome::Opened));
        }
        match File::options().write(true).create_new(true).open(&lock) {
            Ok(mut f) => {
                let _ = writeln!(f, "pid {}", std::process::id());
                let tmp = root.join(format!(".tmp-{name}-{short}-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                let result = (|| {
                    let mut writer = CacheWriter::create(tmp, Some(lock.clone()))?;
                    let report = (build.take().expect("built at most once"))(&mut writer)?;
                    writer.commit(&final_dir, key, report)
                })();
                let _ = std::fs::remove_file(&lock);
                result?;
                return Ok((TokenCache::open(&final_dir)?, Outcome::Built));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let age = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a > STALE_LOCK) {
                    tracing::warn!(
                        lock = %lock.display(),
                        "cache lock untouched for {}s: its builder is gone, rebuilding",
                        STALE_LOCK.as_secs()
                    );
                    let _ = std::fs::remove_file(&lock);
                } else {
                    std::thread::sleep(POLL);
                }
            }
            Err(e) => return Err(io_err(&lock)(e)),
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
