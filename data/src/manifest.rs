//! A committed checkpoint's `manifest.json`: every file with its size and SHA-256.
//!
//! The rank that writes a file digests it and reports the digest with its staging directory;
//! the coordinator writes the manifest from those reports (reading no file), and whoever loads
//! a checkpoint checks what it reads against the manifest. Shared here because the coordinator
//! (no libtorch) writes it and the workers read it.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "ferrotune-checkpoint/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub is_final: bool,
    pub files: Vec<FileDigest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a ferrotune manifest: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{} is damaged: {what} (the manifest says {expected}); the checkpoint cannot be trusted", path.display())]
    Damaged {
        path: PathBuf,
        what: String,
        expected: String,
    },
}

impl ManifestError {
    /// The damaged or unreadable file, to name in a warning.
    pub fn path(&self) -> &Path {
        match self {
            ManifestError::Io { path, .. }
            | ManifestError::Invalid { path, .. }
            | ManifestError::Damaged { path, .. } => path,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Size and SHA-256 (lowercase hex) of one file, read once in 1 MiB blocks.
pub fn digest_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `root` (the manifest itself excepted), relative and sorted.
pub fn list_files(root: &Path) -> Result<Vec<(String, PathBuf)>, ManifestError> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ManifestError> {
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if dir != root || path.file_name().is_some_and(|n| n != MANIFEST) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// Digests of every file under `root`, files hashed in parallel.
pub fn digest_tree(root: &Path) -> Result<Vec<FileDigest>, ManifestError> {
    list_files(root)?
        .into_par_iter()
        .map(|(rel, path)| {
            let (bytes, sha256) = digest_file(&path).map_err(io(&path))?;
            Ok(FileDigest {
                path: rel,
                bytes,
                sha256,
            })
        })
        .collect()
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| ManifestError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if manifest.format != FORMAT {
            return Err(ManifestError::Invalid {
                path,
                message: format!("format `{}`, expected `{FORMAT}`", manifest.format),
            });
        }
        Ok(manifest)
    }

    /// Every listed file exists with its size: cheap (no file is read), catches truncation and
    /// missing files.
    pub fn check_sizes(&self, dir: &Path) -> Result<(), ManifestError> {
        for f in &self.files {
            let path = dir.join(&f.path);
            let meta = std::fs::metadata(&path).map_err(io(&path))?;
            if meta.len() != f.bytes {
                return Err(ManifestError::Damaged {
                    path,
                    what: format!("{} bytes", meta.len()),
                    expected: format!("{} bytes", f.bytes),
                });
            }
        }
        Ok(())
    }

    /// Every listed file has its size and SHA-256 (files hashed in parallel).
    pub fn verify(&self, dir: &Path) -> Result<(), ManifestError> {
        self.check_sizes(dir)?;
        self.files.par_iter().try_for_each(|f| {
            let path = dir.join(&f.path);
            let (_, sha256) = digest_file(&path).map_err(io(&path))?;
            if sha256 == f.sha256 {
                Ok(())
            } else {
                Err(ManifestError::Damaged {
                    path,
                    what: format!("SHA-256 {sha256}"),
                    expected: format!("SHA-256 {}", f.sha256),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_list_every_file_and_verification_names_the_damaged_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("training_state")).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(dir.join("training_state/optimizer.safetensors"), b"moments").unwrap();
        let files = digest_tree(dir).unwrap();
        assert_eq!(
            files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
            ["model.safetensors", "training_state/optimizer.safetensors"]
        );
        // sha256(b"weights") from Python's hashlib.
        assert_eq!(files[0].bytes, 7);
        assert_eq!(
            files[0].sha256,
            "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"
        );
        let manifest = Manifest {
            format: FORMAT.into(),
            step: 3,
            is_final: false,
            files,
        };
        std::fs::write(
            dir.join(MANIFEST),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        let read = Manifest::read(dir).unwrap();
        assert_eq!(read, manifest);
        read.verify(dir).unwrap();

        // One byte flipped, same size: only the hash sees it.
        std::fs::write(dir.join("training_state/optimizer.safetensors"), b"momentz").unwrap();
        read.check_sizes(dir).unwrap();
        let err = read.verify(dir).unwrap_err();
        assert!(
            err.path().ends_with("training_state/optimizer.safetensors"),
            "{err}"
        );
        // Truncated: the size check is enough.
        std::fs::write(dir.join("model.safetensors"), b"weig").unwrap();
        let err = read.check_sizes(dir).unwrap_err();
        assert!(err.to_string().contains("4 bytes"), "{err}");
    }
}
