//! `coordinator plan` against reality: for three model shapes (the tiny example with 2 workers,
//! the ~30M-parameter bench model, and a third shape that was not used while the estimate was
//! written: tied embeddings, no grouped-query attention), short real jobs report each worker's
//! peak resident memory above its pre-model baseline (heartbeats → metrics.jsonl), and the
//! estimate must be within 25 % of it for every rank. An over-large micro-batch on a small
//! `--device-memory` is refused by `launch` before anything starts, naming the activations.
//!
//! The jobs run with glibc's mmap threshold pinned (`MALLOC_MMAP_THRESHOLD_`). By default
//! glibc raises the threshold to the size of each large block freed, so from the second step
//! on activations come from the heap, and freed heap memory stays resident in amounts that
//! depend on allocation order: on the tiny model (~110 MB of live tensors) the peak varied by
//! 0–45 MB between otherwise identical runs and machines (a clean-clone CI run measured
//! 147 MB where this machine measured 115–128). The estimate counts live tensors; the pinned
//! threshold returns every large freed block, so the measured peak is the live one (the same
//! runs then agree within 1 MB).

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// A random-init model of this shape with the example tokenizer, and a short job on it.
fn shaped_job(dir: &Path, shape: Value, micro_batch: u32, seq_len: u32) -> std::path::PathBuf {
    let src = repo_root().join("examples/tiny");
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::copy(
        src.join("base/tokenizer.json"),
        dir.join("model/tokenizer.json"),
    )
    .unwrap();
    let mut config = serde_json::json!({
        "model_type": "llama", "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(shape.as_object().unwrap().clone());
    std::fs::write(dir.join("model/config.json"), config.to_string()).unwrap();
    copy_dir(&src.join("data"), &dir.join("data"));
    let yaml = format!(
        "job:
  name: plan-check
cluster:
  launcher: local
  world_size: 1
model:
  path: model
  init: random
data:
  train: data/train.jsonl
  eval: data/eval.jsonl
  eval_max_sequences: 8
  seq_len: {seq_len}
training:
  steps: 3
  micro_batch_size: {micro_batch}
  lr: 1.0e-4
checkpoint:
  dir: runs
  every_steps: 2
"
    );
    let path = dir.join("cluster.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// bench/train_step.py's model.
fn bench_shape() -> Value {
    serde_json::json!({"vocab_size": 8192, "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 4, "tie_word_embeddings": false})
}

/// Runs the job; per rank, peak - baseline resident bytes from `checkpoints`/metrics.jsonl.
fn measured(config: &Path, checkpoints: &str) -> Vec<(u64, f64)> {
    let mut launch = std::process::Command::new(bin("coordinator"));
    launch
        .arg("launch")
        .arg(config)
        .env("MALLOC_MMAP_THRESHOLD_", "131072");
    let mut run = Launch::spawn(launch);
    let status = run.wait(Duration::from_secs(600));
    assert!(status.success(), "{}", run.stderr_text());
    let history = config
        .parent()
        .unwrap()
        .join(checkpoints)
        .join("metrics.jsonl");
    let text = std::fs::read_to_string(&history).unwrap();
    let record: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|r| r["type"] == "memory")
        .unwrap_or_else(|| panic!("no memory record in {}:\n{text}", history.display()));
    record["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let peak = w["peak_bytes"].as_u64().unwrap() as f64;
            let base = w["baseline_bytes"].as_u64().unwrap() as f64;
            assert!(base > 0.0 && peak > 0.0, "{w}");
            (w["rank"].as_u64().unwrap(), peak - base)
        })
        .collect()
}

/// The plan's estimate above the runtime, for rank 0 and for the other ranks.
fn estimated(config: &Path) -> (f64, f64) {
    let out = stdout_of(
        std::process::Command::new(bin("coordinator"))
            .args(["plan", "--json"])
            .arg(config),
    );
    let plan: Value = serde_json::from_str(&out).unwrap();
    let workers = plan["workers"].as_array().unwrap();
    let peak = |w: &Value| w["peak_bytes"].as_u64().unwrap() as f64;
    (peak(&workers[0]), peak(workers.last().unwrap()))
}

fn check(what: &str, config: &Path, checkpoints: &str) {
    let (writer, other) = estimated(config);
    for (rank, measured) in measured(config, checkpoints) {
        let estimate = if rank == 0 { writer } else { other };
        let error = (estimate - measured) / measured;
        eprintln!(
            "{what} rank {rank}: estimate {:.1} MB, measured {:.1} MB ({:+.1} %)",
            estimate / 1e6,
            measured / 1e6,
            100.0 * error
        );
        assert!(
            error.abs() <= 0.25,
            "{what} rank {rank}: estimate {estimate} vs measured peak above baseline {measured}"
        );
    }
}

#[test]
fn the_estimate_is_within_a_quarter_of_the_measured_peak() {
    let _serial = serial();
    let tiny = tempfile::tempdir().unwrap();
    let config = tiny_example(tiny.path());
    edit_config(
        &config,
        &[
            ("steps: 60", "steps: 4"),
            ("every_steps: 30", "every_steps: 2"),
        ],
    );
    check("tiny example, 2 workers", &config, "runs/checkpoints");

    let shapes = [
        ("~30M bench model", bench_shape(), (4, 256)),
        // Not used while writing the estimate: tied embeddings, no grouped-query attention.
        (
            "third shape",
            serde_json::json!({"vocab_size": 2048, "hidden_size": 384,
                "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
                "num_key_value_heads": 6, "tie_word_embeddings": true}),
            (6, 192),
        ),
    ];
    for (what, shape, (micro_batch, seq_len)) in shapes {
        let dir = tempfile::tempdir().unwrap();
        check(
            what,
            &shaped_job(dir.path(), shape, micro_batch, seq_len),
            "runs",
        );
    }
}

/// ZeRO on the ~30M bench model with 2 workers: the measured peak of rank 1 (rank 0 also keeps
/// the weights for checkpoints) drops from stage 0 by at least what the plan predicts less
/// 10 %: half the AdamW moments at stage 1 (and half the fp32 masters under bf16), less the
/// reduced gradient's chunk at stage 2. Only the final checkpoint is written (a periodic one
/// keeps a snapshot of the rank's moments chunk beside training: on a GPU that is host memory,
/// here it would be counted with the rest).
#[test]
fn zero_stages_lower_the_measured_peak_as_predicted() {
    let _serial = serial();
    let runs = [
        ("fp32", 0),
        ("fp32", 1),
        ("fp32", 2),
        ("bf16", 0),
        ("bf16", 1),
    ];
    let mut figures = Vec::new();
    for (precision, stage) in runs {
        let dir = tempfile::tempdir().unwrap();
        let config = shaped_job(dir.path(), bench_shape(), 4, 256);
        edit_config(
            &config,
            &[
                ("world_size: 1", "world_size: 2"),
                (
                    "  init: random\n",
                    &format!("  init: random\n  precision: {precision}\n"),
                ),
                (
                    "  steps: 3\n",
                    &format!("  steps: 3\n  zero_stage: {stage}\n"),
                ),
                ("  every_steps: 2\n", "  every_steps: 3\n"),
            ],
        );
        let (_, predicted) = estimated(&config);
        let rank1 = measured(&config, "runs")
            .into_iter()
            .find(|(rank, _)| *rank == 1)
            .expect("rank 1 reported its memory")
            .1;
        eprintln!(
            "{precision} zero_stage {stage}: rank 1 measured {:.1} MB, estimated {:.1} MB",
            rank1 / 1e6,
            predicted / 1e6
        );
        figures.push((precision, stage, predicted, rank1));
    }
    for &(precision, stage, predicted, measured) in &figures {
        let Some(&(_, _, plain_predicted, plain_measured)) = figures
            .iter()
            .find(|f| f.0 == precision && f.1 == 0)
            .filter(|_| stage > 0)
        else {
            continue;
        };
        let (want, got) = (plain_predicted - predicted, plain_measured - measured);
        eprintln!(
            "{precision} zero_stage {stage} saves {:.1} MB on rank 1 (predicted {:.1} MB)",
            got / 1e6,
            want / 1e6
        );
        assert!(want > 50e6, "the plan predicts a saving at stage {stage}");
        assert!(
            got >= 0.9 * want,
            "{precision} zero_stage {stage} saved {got} bytes, predicted {want}"
        );
    }
}

#[test]
fn an_over_large_micro_batch_is_refused_before_anything_starts() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_example(tmp.path());
    edit_config(&config, &[("micro_batch_size: 8", "micro_batch_size: 512")]);
    let plan_on_4gib = || {
        stdout_of(
            std::process::Command::new(bin("coordinator"))
                .arg("plan")
                .arg(&config)
                .args(["--device-memory", "4GiB"]),
        )
    };
    let plan = plan_on_4gib();
    assert!(plan.contains("the job does not fit"), "{plan}");
    for term in ["weights", "gradients", "optimizer state", "activations"] {
        assert!(plan.contains(term), "{term} missing:\n{plan}");
    }
    let mut run = Launch::start_with(&config, &["--device-memory", "4GiB"]);
    let err = run.refused(
        "over-large micro-batch",
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert!(
        err.contains("biggest term is activations") && err.contains("micro_batch_size 512"),
        "{err}"
    );
    assert!(err.contains("activation_checkpointing"), "{err}");
    assert!(
        !tmp.path().join("runs").exists(),
        "nothing is written when refused"
    );
    // With checkpointing the same job fits.
    edit_config(
        &config,
        &[(
            "  init: pretrained",
            "  init: pretrained\n  activation_checkpointing: true",
        )],
    );
    let plan = plan_on_4gib();
    assert!(plan.trim_end().ends_with(": fits"), "{plan}");
}
