//! Shared by the worker's integration tests: the Python reference (PyTorch + transformers) and
//! the golden values it generates.
#![allow(dead_code)]

pub mod ring;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Kind, Tensor};

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// FERROTUNE_PYTHON (set by `make test`) if it can import torch and transformers. Outside CI a
/// missing reference skips the comparison with a message; under CI=true it fails the test.
pub fn reference_python() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let why = match std::env::var_os("FERROTUNE_PYTHON") {
                None => "FERROTUNE_PYTHON is not set (run the suite through `make test`)".into(),
                Some(p) => {
                    let ok = Command::new(&p)
                        .args(["-c", "import torch, transformers"])
                        .status()
                        .is_ok_and(|s| s.success());
                    if ok {
                        return Some(PathBuf::from(p));
                    }
                    format!(
                        "{} cannot import torch and transformers (`make venv` installs them)",
                        PathBuf::from(p).display()
                    )
                }
            };
            assert!(
                !under_ci(),
                "the transformers reference is required under CI=true: {why}"
            );
            eprintln!("skipping comparison with transformers: {why}");
            None
        })
        .clone()
}

fn parity_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/parity")
        .join(name)
}

/// Runs a script of tests/parity with the reference Python; panics with its output on failure.
pub fn run_reference(python: &Path, script: &str, args: &[&Path]) {
    let out = Command::new(python)
        .arg(parity_script(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("run the reference Python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The installed torch and transformers versions, read from package metadata (no import).
fn reference_versions(python: &Path) -> Vec<u8> {
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('torch'), m.version('transformers'))",
        ])
        .output()
        .expect("run the reference Python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The golden values of hf_goldens.py, generated once per script version and per installed
/// torch + transformers into the target directory (written to a temporary name, then renamed,
/// so a half-written set is never used).
pub fn goldens() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        // Goldens generated elsewhere and carried (a GPU machine without transformers).
        if let Some(dir) = std::env::var_os("FERROTUNE_GOLDENS") {
            return Some(PathBuf::from(dir));
        }
        let python = reference_python()?;
        let mut key = std::fs::read(parity_script("hf_goldens.py")).unwrap();
        key.extend(reference_versions(&python));
        let hash = key.iter().fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-goldens-{hash:016x}"));
        if !dir.join("versions.json").is_file() {
            let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).unwrap();
            run_reference(&python, "hf_goldens.py", &[&tmp]);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).unwrap();
        }
        Some(dir)
    })
    .clone()
}

pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// max |a - b| / max |b|: relative error on the scale of the reference tensor.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let a = ours.to_kind(Kind::Double);
    let b = reference.to_kind(Kind::Double);
    assert_eq!(a.size(), b.size(), "shapes differ");
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}
