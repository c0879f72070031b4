//! Checkpoints are written in the background: with a deliberately slow writer, training goes on
//! while a checkpoint is written, the training thread is held up for a small fraction of the
//! write, and the result is byte-identical to a job whose checkpoints were quick.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const DELAY_MS: u64 = 2000;

fn run(dir: &Path, name: &str, delay_ms: Option<u64>) -> (String, Vec<u8>) {
    let text = random_model_job(1, 2, 3, 40, 1e-2, name).replace(
        &format!("  dir: {name}\n"),
        &format!("  dir: {name}\n  every_steps: 10\n"),
    );
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, text).unwrap();
    let mut cmd = std::process::Command::new(bin("coordinator"));
    cmd.arg("launch").arg(&config);
    if let Some(ms) = delay_ms {
        // Inherited by the workers the coordinator starts.
        cmd.env("FERROTUNE_TEST_CHECKPOINT_DELAY_MS", ms.to_string());
    }
    let mut launch = Launch::spawn(cmd);
    let status = launch.wait(Duration::from_secs(180));
    let out = launch.stdout_text();
    assert!(status.success(), "{out}\n{}", launch.stderr_text());
    let root = dir.join(name);
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    let model = std::fs::read(root.join(latest.trim()).join("model.safetensors")).unwrap();
    (out, model)
}

/// (training held up, write time) of the commit line of `step`.
fn timing(out: &str, step: u64) -> (f64, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("checkpoint step {step} committed")))
        .unwrap_or_else(|| panic!("no commit of step {step}:\n{out}"));
    let number = |after: &str| -> f64 {
        line.split(after)
            .nth(1)
            .unwrap()
            .split(" s")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (number("held up "), number("background in "))
}

#[test]
fn training_goes_on_while_a_slow_checkpoint_is_written() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let (slow_out, slow_model) = run(tmp.path(), "slow", Some(DELAY_MS));
    let lines: Vec<&str> = slow_out.lines().collect();
    let position = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l)).unwrap();
    let committed = position(&|l: &str| l.starts_with("checkpoint step 10 committed"));
    let later_step = position(&|l: &str| l.starts_with("step") && l.contains(" 12/40 "));
    assert!(
        later_step < committed,
        "steps 11 and 12 must be trained while step 10's checkpoint is written:\n{slow_out}"
    );
    let (stall, write) = timing(&slow_out, 10);
    assert!(write >= DELAY_MS as f64 / 1000.0, "{write}");
    assert!(
        stall < write / 10.0,
        "training was held up {stall} s for a {write} s write"
    );

    let (_, quick_model) = run(tmp.path(), "quick", None);
    assert!(
        slow_model == quick_model,
        "a checkpoint's timing must not change the training"
    );
}
