//! `coordinator launch --resume`: a job killed mid-run (SIGKILL, no chance to clean up) and
//! resumed from its newest committed checkpoint ends bit-identical to the same job run without
//! interruption: weights, AdamW moments, trainer state and every later step's loss line. With
//! fp32 model files, and with bfloat16 ones (the fp32 masters then travel in training_state/);
//! at ZeRO stages 1 and 2 with the optimizer state saved per rank.
//! Resumes that cannot continue exactly are refused before any worker starts.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STEPS: u64 = 60;
/// examples/tiny's cluster.world_size.
const WORKERS: usize = 2;

/// The tiny job, 60 steps, a checkpoint every 20 (all kept), a line per step.
fn job(dir: &Path, dtype: Option<&str>) -> PathBuf {
    job_at_stage(dir, dtype, 0)
}

/// The same job with `training.zero_stage`.
fn job_at_stage(dir: &Path, dtype: Option<&str>, zero_stage: u32) -> PathBuf {
    let config = tiny_example(dir);
    let mut text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("steps: 60", &format!("steps: {STEPS}"))
        .replace("log_every_steps: 5", "log_every_steps: 1")
        .replace("every_steps: 30", "every_steps: 20")
        .replace("keep: 2", "keep: 5");
    if let Some(d) = dtype {
        text = text.replace("  keep: 5", &format!("  keep: 5\n  dtype: {d}"));
    }
    if zero_stage == 2 {
        // Stage 2 also runs bf16 compute, whose fp32 masters are sharded as well.
        text = text.replace("model:\n", "model:\n  precision: bf16\n");
    }
    if zero_stage > 0 {
        text = text.replace(
            "training:\n",
            &format!("training:\n  zero_stage: {zero_stage}\n"),
        );
    }
    std::fs::write(&config, text).unwrap();
    config
}

fn checkpoints(dir: &Path) -> PathBuf {
    dir.join("runs/checkpoints")
}

/// The step lines without their timing: step, loss, lr, grad_norm.
fn step_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| l.rsplit_once(" | ").unwrap().0.to_string())
        .collect()
}

/// Files whose bytes must match between an interrupted-and-resumed run and a straight one: the
/// model, the trainer state and every file of optimizer state (one per rank at ZeRO stages 1
/// and 2), the fp32 masters when the model files are narrower.
fn state_files(checkpoint: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![
        "model.safetensors".to_string(),
        "training_state/trainer_state.json".to_string(),
    ];
    let mut saved: Vec<String> = std::fs::read_dir(checkpoint.join("training_state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("optimizer") || n == "master_weights.safetensors")
        .map(|n| format!("training_state/{n}"))
        .collect();
    saved.sort();
    names.extend(saved);
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(checkpoint.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

/// The optimizer files of a checkpoint: one per parameter-state file at stage 0, one per rank
/// (with the shard map in trainer_state.json) at stages 1 and 2.
fn assert_optimizer_layout(files: &[(String, Vec<u8>)], zero_stage: u32, workers: usize) {
    let optimizer: Vec<&str> = files
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("training_state/optimizer"))
        .collect();
    let state: serde_json::Value = serde_json::from_slice(
        &files
            .iter()
            .find(|(n, _)| n.ends_with("trainer_state.json"))
            .unwrap()
            .1,
    )
    .unwrap();
    if zero_stage == 0 {
        assert_eq!(optimizer, ["training_state/optimizer.safetensors"]);
        assert!(state.get("optimizer_shards").is_none());
        return;
    }
    let want: Vec<String> = (0..workers)
        .map(|r| format!("training_state/optimizer-rank-{r:05}-of-{workers:05}.safetensors"))
        .collect();
    assert_eq!(optimizer, want);
    let map = &state["optimizer_shards"];
    let files = map["files"].as_array().unwrap();
    assert_eq!(files.len(), workers);
    assert_eq!(files[0]["start"], 0);
    let total: u64 = map["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert_eq!(files[workers - 1]["end"].as_u64(), Some(total));
}

/// (stdout, stderr) of a launch that must succeed.
fn run_to_end(mut launch: Launch) -> (String, String) {
    let status = launch.wait(Duration::from_secs(300));
    let (out, err) = (launch.stdout_text(), launch.stderr_text());
    assert!(status.success(), "{out}\n{err}");
    (out, err)
}

const CHANGED: &str = "is not the data";

fn interrupted_then_resumed(dtype: Option<&str>, zero_stage: u32) {
    let straight_dir = tempfile::tempdir().unwrap();
    let (straight, _) = run_to_end(Launch::start(&job_at_stage(
        straight_dir.path(),
        dtype,
        zero_stage,
    )));
    let final_name = format!("step-{STEPS:08}");
    let reference = state_files(&checkpoints(straight_dir.path()).join(&final_name));
    let masters = reference
        .iter()
        .any(|(n, _)| n.ends_with("master_weights.safetensors"));
    assert_eq!(
        masters,
        dtype.is_some(),
        "fp32 masters are saved exactly when the model files are narrower"
    );
    assert_optimizer_layout(&reference, zero_stage, WORKERS);

    // The same job, SIGKILLed once its first checkpoint is committed.
    let dir = tempfile::tempdir().unwrap();
    let config = job_at_stage(dir.path(), dtype, zero_stage);
    let mut first = Launch::start(&config);
    let manifest = checkpoints(dir.path()).join("step-00000020/manifest.json");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !manifest.is_file() {
        assert!(Instant::now() < deadline, "no checkpoint at step 20");
        assert!(
            first.child.try_wait().unwrap().is_none(),
            "{}",
            first.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let left = wait_no_tagged(&first.tag, Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "workers outlived the killed coordinator: {left:?}"
    );
    assert!(
        !checkpoints(dir.path()).join(&final_name).exists(),
        "the job was killed before it finished"
    );

    let (resumed, err) = run_to_end(Launch::start_with(&config, &["--resume"]));
    assert!(!err.contains(CHANGED), "the data did not change: {err}");
    let from: u64 = resumed
        .lines()
        .find_map(|l| l.strip_prefix("resuming from "))
        .and_then(|l| l.split("(step ").nth(1))
        .and_then(|l| l.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `resuming from` line:\n{resumed}"));
    assert!(
        (20..STEPS).contains(&from) && from.is_multiple_of(20),
        "resumed at {from}"
    );
    assert!(resumed.contains(&format!("held-out loss at step {from} (resumed)")));

    let got = state_files(&checkpoints(dir.path()).join(&final_name));
    assert_eq!(got.len(), reference.len());
    for ((name, want), (_, have)) in reference.iter().zip(&got) {
        assert!(
            want == have,
            "{name} differs from the uninterrupted run's (resumed at step {from})"
        );
    }
    let want = step_lines(&straight);
    let have = step_lines(&resumed);
    assert_eq!(have.len() as u64, STEPS - from, "{resumed}");
    assert_eq!(&want[from as usize..], &have[..], "per-step losses differ");
    let after = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("held-out loss after fine-tuning"))
            .map(String::from)
    };
    assert_eq!(after(&straight), after(&resumed));
    assert!(after(&resumed).is_some());

    // The history of both runs (steps past `from` were trained twice) holds every step once,
    // as the resumed run trained it.
    let status_of = |root: &Path| -> serde_json::Value {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.arg("status").arg(checkpoints(root)).arg("--json");
        serde_json::from_str(&stdout_of(&mut cmd)).unwrap()
    };
    let status = status_of(dir.path());
    assert_valid_plots(&checkpoints(dir.path()));
    assert_eq!(status["source"], "history");
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["resumed"], serde_json::json!([from]));
    let steps: Vec<u64> = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    let straight_status = status_of(straight_dir.path());
    // Bit-identical training: the same losses, rates and norms (the timings differ).
    let figures = |s: &serde_json::Value| -> Vec<serde_json::Value> {
        s["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| serde_json::json!([p["step"], p["loss"], p["lr"], p["grad_norm"]]))
            .collect()
    };
    assert_eq!(
        figures(&status),
        figures(&straight_status),
        "the resumed history equals the straight run's"
    );
}

#[test]
fn a_killed_job_resumes_bit_identical_with_fp32_files() {
    let _serial = serial();
    interrupted_then_resumed(None, 0);
}

#[test]
fn a_killed_job_resumes_bit_identical_with_bf16_files() {
    let _serial = serial();
    interrupted_then_resumed(Some("bfloat16"), 0);
}

/// Sharded AdamW moments are saved per rank (with the shard map) and each rank takes its chunk
/// back on resume: still bit-identical.
#[test]
fn a_killed_zero_stage_1_job_resumes_bit_identical() {
    let _serial = serial();
    interrupted_then_resumed(None, 1);
}

#[test]
fn a_killed_zero_stage_2_bf16_compute_job_with_bf16_files_resumes_bit_identical() {
    let _serial = serial();
    interrupted_then_resumed(Some("bfloat16"), 2);
}

fn refused(config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("coordinator"))
        .arg("launch")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn resumes_that_cannot_continue_exactly_are_refused_before_starting() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), None);
    let root = checkpoints(dir.path());

    let err = refused(&config, &["--resume"]);
    assert!(err.contains("no committed checkpoint under"), "{err}");
    let err = refused(&config, &["--resume", dir.path().to_str().unwrap()]);
    assert!(err.contains("is not a committed checkpoint"), "{err}");

    // A short run leaves step 20 and its final step 30.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("steps: 60", "steps: 30")).unwrap();
    run_to_end(Launch::start(&config));
    std::fs::remove_dir_all(root.join("logs")).unwrap();
    let err = refused(&config, &["--resume"]);
    assert!(err.contains("nothing is left to train"), "{err}");

    let step20 = root.join("step-00000020");
    for (from, to, field) in [
        ("seq_len: 160", "seq_len: 150", "`data.seq_len` is 150"),
        ("seed: 1234", "seed: 99", "`job.seed` is 99"),
        (
            "micro_batch_size: 8",
            "micro_batch_size: 4",
            "8 sequences per step",
        ),
    ] {
        std::fs::write(&config, text.replace(from, to)).unwrap();
        let err = refused(&config, &["--resume", step20.to_str().unwrap()]);
        assert!(
            err.contains(field) && err.contains("step-00000020"),
            "{from} -> {to}: {err}"
        );
    }
    assert!(!root.join("logs").exists(), "no worker may have started");

    // Changed data may be resumed on (fixing data mid-run is legitimate), with a warning.
    std::fs::write(&config, text.replace("steps: 60", "steps: 40")).unwrap();
    let train = dir.path().join("data/train.jsonl");
    let lines = std::fs::read_to_string(&train).unwrap();
    let kept: Vec<&str> = lines.lines().skip(1).collect();
    std::fs::write(&train, kept.join("\n") + "\n").unwrap();
    let (out, err) = run_to_end(Launch::start_with(&config, &["--resume"]));
    assert!(
        out.contains("resuming from") && out.contains("(step 30/40)"),
        "{out}"
    );
    assert!(
        err.contains(&format!("warning: dataset train {CHANGED}")),
        "{err}"
    );
    assert!(root.join("step-00000040/manifest.json").is_file());
}

/// Flips the last byte of `file` (its size stays: only a hash can tell).
fn flip_last_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_damaged_checkpoint_is_never_trained_on_and_the_one_before_it_is_resumed() {
    let _serial = serial();
    let every = |config: &Path| {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(config, text.replace("every_steps: 20", "every_steps: 15")).unwrap();
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight_config = job(straight_dir.path(), None);
    every(&straight_config);
    run_to_end(Launch::start(&straight_config));
    let final_name = format!("step-{STEPS:08}");
    let reference = state_files(&checkpoints(straight_dir.path()).join(&final_name));

    // Checkpoints at 15, 30 and 45; killed before the end.
    let dir = tempfile::tempdir().unwrap();
    let config = job(dir.path(), None);
    every(&config);
    let root = checkpoints(dir.path());
    let mut first = Launch::start(&config);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !root.join("step-00000045/manifest.json").is_file() {
        assert!(Instant::now() < deadline, "no checkpoint at step 45");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    wait_no_tagged(&first.tag, Duration::from_secs(30));
    assert!(!root.join(&final_name).exists(), "killed before the end");

    // One byte of the newest checkpoint's weights (same size: only the workers' hash check can
    // tell), and a truncated file in the one before (found by size). The workers refuse step 45
    // naming the file; the restart sets it aside, finds step 30 short, sets it aside too, and
    // the job goes on from step 15 to the same end as the straight run.
    flip_last_byte(&root.join("step-00000045/model.safetensors"));
    let optimizer = root.join("step-00000030/training_state/optimizer.safetensors");
    let bytes = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, &bytes[..bytes.len() / 2]).unwrap();
    let (out, err) = run_to_end(Launch::start_with(&config, &["--resume"]));
    assert!(
        out.contains("step-00000045/model.safetensors is damaged") && out.contains("SHA-256"),
        "{out}"
    );
    assert!(out.contains("restart 1 of 3: "), "{out}");
    assert!(
        err.contains("step-00000045/model.safetensors does not match its checkpoint's manifest")
            && err.contains("is set aside as"),
        "{err}"
    );
    assert!(root.join(".damaged-step-00000045").is_dir());
    assert!(
        err.contains("optimizer.safetensors is damaged") && err.contains("is set aside as"),
        "{err}"
    );
    assert!(
        out.contains("training continues from step-00000015"),
        "{out}"
    );
    let got = state_files(&root.join(&final_name));
    assert!(
        got == reference,
        "the job resumed from step 15 differs from the uninterrupted run"
    );
}
