//! Load and save hold at most one extra shard: a ~110 MB model in ~17 MB shards is loaded in a
//! fresh process (so freed memory of earlier work cannot hide a copy) and its peak resident
//! memory above the baseline is compared with parameters + one shard.

use ferrotune_worker::model::io::{LoadedModel, SaveOptions};
use ferrotune_worker::model::DType;
use std::path::Path;
use std::process::Command;
use tch::Device;

const CHILD_ENV: &str = "FERROTUNE_MEMORY_CHILD";
const SHARD: u64 = 16 << 20;
/// Allocator and libtorch bookkeeping noise.
const SLACK: u64 = 16 << 20;

fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resets the peak-RSS counter (VmHWM) to the current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM needs Linux >= 4.0");
}

fn largest_shard(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .max()
        .unwrap()
}

/// The child half: loads the checkpoint named by CHILD_ENV and prints its peak extra memory.
#[test]
fn child_load_peak() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    // Load libtorch's kernels and allocator first: they are not the loader's memory.
    let _warm = tch::Tensor::ones([8], (tch::Kind::Float, Device::Cpu)).sum(tch::Kind::Float);
    reset_peak();
    let base = status_bytes("VmRSS:");
    let model = LoadedModel::load(Path::new(&dir), false, Device::Cpu).unwrap();
    let extra = status_bytes("VmHWM:") - base;
    println!("\nEXTRA {extra}");
    drop(model);
}

#[test]
fn load_and_save_hold_at_most_one_extra_shard() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false
    });
    std::fs::write(src.join("config.json"), config.to_string()).unwrap();
    tch::manual_seed(1);
    let model = LoadedModel::load(&src, true, Device::Cpu).unwrap();
    let params: u64 = model
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() as u64 * 4)
        .sum();

    let out = tmp.path().join("sharded");
    let options = SaveOptions {
        dtype: DType::F32,
        max_shard_bytes: SHARD,
    };
    reset_peak();
    let base = status_bytes("VmRSS:");
    model.save_pretrained(&out, &src, &options).unwrap();
    let save_extra = status_bytes("VmHWM:") - base;
    let shard = largest_shard(&out);
    drop(model);

    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_load_peak",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, &out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&child.stderr)
    );
    let load_extra: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EXTRA "))
        .unwrap_or_else(|| panic!("child printed no EXTRA line:\n{stdout}"))
        .trim()
        .parse()
        .unwrap();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "parameters {:.1} MiB, largest shard {:.1} MiB: load peak +{:.1} MiB, save peak +{:.1} MiB",
        mib(params),
        mib(shard),
        mib(load_extra),
        mib(save_extra)
    );
    assert!(
        load_extra <= params + shard + SLACK,
        "load held {:.1} MiB above its parameters' {:.1} MiB (a shard is {:.1} MiB)",
        mib(load_extra),
        mib(params),
        mib(shard)
    );
    assert!(
        save_extra <= shard + SLACK,
        "save held {:.1} MiB extra (a shard is {:.1} MiB)",
        mib(save_extra),
        mib(shard)
    );
}
