//! Broken checkpoints are refused with a message naming the file and what is wrong, never a
//! panic: a missing shard, a wrong tensor shape, a config without a required field, an
//! unknown dtype, a truncated safetensors file, an unsupported option.

use ferrotune_worker::model::io::{LoadedModel, SaveOptions};
use std::path::Path;
use std::process::Command;
use tch::Device;

fn config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "torch_dtype": "float32"
    })
}

/// A valid sharded checkpoint in `dir`.
fn write_model(dir: &Path) {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("config.json"), config().to_string()).unwrap();
    tch::manual_seed(0);
    let model = LoadedModel::load(src.path(), true, Device::Cpu).unwrap();
    let options = SaveOptions {
        max_shard_bytes: 4096,
        ..SaveOptions::default()
    };
    model.save_pretrained(dir, src.path(), &options).unwrap();
    LoadedModel::load(dir, false, Device::Cpu).expect("the unbroken checkpoint loads");
}

/// The n-th (0-based) shard file name of the checkpoint in `dir`.
fn shard(dir: &Path, n: usize) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    names.sort();
    assert!(
        names.len() > n,
        "expected a sharded checkpoint, found {names:?}"
    );
    names[n].clone()
}

fn load_error(dir: &Path) -> String {
    match LoadedModel::load(dir, false, Device::Cpu) {
        Ok(_) => panic!("a broken checkpoint in {} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(&path, value.to_string()).unwrap();
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in the error: {err}");
    }
}

#[test]
fn missing_shard_named_in_the_index() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let missing = shard(dir.path(), 1);
    std::fs::remove_file(dir.path().join(&missing)).unwrap();
    let err = load_error(dir.path());
    assert_mentions(
        &err,
        &["model.safetensors.index.json", &missing, "does not exist"],
    );
}

#[test]
fn tensor_with_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    // The weights were written for intermediate_size 24; the config now says 32.
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), 32.into());
    });
    let err = load_error(dir.path());
    assert_mentions(&err, &["mlp.", "has shape", "config.json implies"]);
}

#[test]
fn config_missing_a_required_field() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    edit_config(dir.path(), |c| {
        c.remove("num_hidden_layers");
    });
    let err = load_error(dir.path());
    assert_mentions(&err, &["config.json", "`num_hidden_layers`", "missing"]);
}

#[test]
fn unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    // transformers 4 writes `torch_dtype`, 5 writes `dtype`; both are checked.
    for field in ["torch_dtype", "dtype"] {
        edit_config(dir.path(), |c| {
            c.remove("dtype");
            c.insert(field.into(), "float8_e4m3".into());
        });
        let err = load_error(dir.path());
        assert_mentions(&err, &[&format!("`{field}`"), "float8_e4m3", "bfloat16"]);
    }
}

#[test]
fn truncated_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let name = shard(dir.path(), 2);
    let path = dir.path().join(&name);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 100).unwrap();
    let err = load_error(dir.path());
    assert_mentions(&err, &[&name, "truncated or corrupt"]);
}

#[test]
fn unsupported_options_are_named() {
    for (field, value, needle) in [
        ("model_type", serde_json::json!("gpt_neox"), "gpt_neox"),
        ("hidden_act", serde_json::json!("gelu"), "gelu"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("num_key_value_heads", serde_json::json!(3), "divide"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path());
        edit_config(dir.path(), |c| {
            c.insert(field.into(), value.clone());
        });
        let err = load_error(dir.path());
        assert_mentions(&err, &[field, needle]);
    }
}

/// The CLI reports the same error on one line, exit code 1, no panic or backtrace.
#[test]
fn worker_score_reports_a_broken_checkpoint_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let missing = shard(dir.path(), 0);
    std::fs::remove_file(dir.path().join(&missing)).unwrap();
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, "{\"text\": \"hello\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["score", "--model"])
        .arg(dir.path())
        .arg("--input")
        .arg(&input)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(&missing), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}
