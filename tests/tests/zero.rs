//! `training.zero_stage` through the real launcher and workers: stages 1 and 2 train as stage 0
//! does (weights, and the loss and gradient norm of every step, with clipping active) on 2 and
//! 3 workers; a 3-worker stage-1 checkpoint continues on 2 workers as the 3-worker run did.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Clipping at this norm is active at every step of these jobs (checked).
const CLIP: f64 = 0.05;

struct Job<'a> {
    name: &'a str,
    world: u32,
    stage: u32,
    precision: &'a str,
    grad_accum: u32,
    steps: u64,
    every: u64,
}

fn write_job(dir: &Path, job: &Job) -> PathBuf {
    let path = dir.join(format!("{}.yaml", job.name));
    let text = random_model_job(job.world, 2, 5, job.steps, 1.0e-2, job.name)
        .replace(
            "  grad_clip: 1.0\n",
            &format!(
                "  grad_clip: {CLIP}\n  zero_stage: {}\n  grad_accum_steps: {}\n",
                job.stage, job.grad_accum
            ),
        )
        .replace("  grad_accum_steps: 2\n  lr", "  lr")
        .replace(
            "  init: random\n",
            &format!("  init: random\n  precision: {}\n", job.precision),
        )
        .replace(
            &format!("  dir: {}\n", job.name),
            &format!(
                "  dir: {}\n  every_steps: {}\n  keep: 10\n",
                job.name, job.every
            ),
        );
    std::fs::write(&path, text).unwrap();
    path
}

fn run(config: &Path, args: &[&str]) -> String {
    let mut launch = Launch::start_with(config, args);
    let status = launch.wait(Duration::from_secs(180));
    let out = launch.stdout_text();
    assert!(status.success(), "{out}\n{}", launch.stderr_text());
    out
}

/// Per step, within `tolerance(step)` relative.
fn assert_same_steps(
    want: &[StepRecord],
    have: &[StepRecord],
    what: &str,
    tolerance: impl Fn(u64) -> f64,
) {
    assert_eq!(want.len(), have.len(), "{what}");
    let relative = |x: f64, y: f64| ((x - y) / y).abs();
    let worst = want
        .iter()
        .zip(have)
        .map(|(a, b)| relative(b.loss, a.loss).max(relative(b.grad_norm, a.grad_norm)))
        .fold(0.0, f64::max);
    eprintln!("{what}: loss and grad_norm within {worst:e} (relative)");
    for (a, b) in want.iter().zip(have) {
        assert_eq!(a.step, b.step, "{what}");
        let close = |x: f64, y: f64| (x - y).abs() <= tolerance(a.step) * y.abs().max(1.0);
        assert!(
            close(b.loss, a.loss) && close(b.grad_norm, a.grad_norm),
            "{what}: step {} loss {} grad_norm {}, expected {} and {}",
            a.step,
            b.loss,
            b.grad_norm,
            a.loss,
            a.grad_norm
        );
    }
}

#[test]
fn stages_1_and_2_train_as_stage_0_on_2_and_3_workers() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    // bf16 compute: the fp32 masters are sharded too, the bf16 weights all-gathered.
    for (world, precision) in [(2, "fp32"), (3, "fp32"), (2, "bf16")] {
        let job = |stage, name| Job {
            name,
            world,
            stage,
            precision,
            grad_accum: 2,
            steps: 6,
            every: 0,
        };
        let names = [0, 1, 2].map(|stage| format!("{precision}-w{world}-stage{stage}"));
        for (stage, name) in names.iter().enumerate() {
            run(&write_job(tmp.path(), &job(stage as u32, name)), &[]);
        }
        let root = |name: &str| tmp.path().join(name);
        let reference = step_history(&root(&names[0]));
        assert_eq!(reference.len(), 6);
        assert!(
            reference.iter().all(|s| s.grad_norm > 2.0 * CLIP),
            "clipping is active at every step: {reference:?}"
        );
        let weights = latest_weights(&root(&names[0]));
        // Under bf16 the clipping norm's summation order (the only difference) rounds a few
        // compute weights the other way after the first update, and the steps after it
        // amplify that (measured: 2e-8 at step 2, 1e-5 at 3, 2e-3 at 5): the first two steps
        // are compared tightly (a chunk updated wrongly or not gathered shows at step 2), the
        // rest loosely.
        let bf16 = precision == "bf16";
        let tolerance = |step: u64| if bf16 && step > 2 { 1e-2 } else { 1e-5 };
        for name in &names[1..] {
            assert_same_steps(&reference, &step_history(&root(name)), name, tolerance);
            let diff = max_abs_diff(&weights, &latest_weights(&root(name)));
            eprintln!("{name}: max |w - w(stage 0)| = {diff:e}");
            // (Under bf16 a weight whose tiny gradient changed sign is up to lr per step
            // away; the step checks above carry the comparison there.)
            assert!(
                bf16 || diff <= 1e-5,
                "{name}: weights differ from stage 0's by {diff}"
            );
        }
    }
}

/// The elastic "shrink" path: the optimizer state saved by 3 ranks is re-sharded over 2, the
/// global batch kept (2 × 2 × 3 = 3 × 2 × 2 sequences), and training goes on as it would have.
#[test]
fn a_stage_1_checkpoint_of_3_workers_continues_on_2() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let three = Job {
        name: "three",
        world: 3,
        stage: 1,
        precision: "fp32",
        grad_accum: 2,
        steps: 6,
        every: 3,
    };
    run(&write_job(tmp.path(), &three), &[]);
    // Saved per rank: three files, and the shard map that says which range each holds.
    let from = tmp.path().join("three/step-00000003");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(from.join("training_state/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let files = state["optimizer_shards"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    for (rank, f) in files.iter().enumerate() {
        let name = format!("optimizer-rank-{rank:05}-of-00003.safetensors");
        assert_eq!(f["file"], name.as_str());
        assert!(from.join("training_state").join(&name).is_file());
    }
    assert!(!from.join("training_state/optimizer.safetensors").exists());
    let two = Job {
        name: "two",
        world: 2,
        grad_accum: 3,
        ..three
    };
    let out = run(
        &write_job(tmp.path(), &two),
        &["--resume", from.to_str().unwrap()],
    );
    assert!(out.contains("resuming from"), "{out}");
    let straight = step_history(&tmp.path().join("three"));
    let resumed = step_history(&tmp.path().join("two"));
    assert_eq!(resumed.first().map(|s| s.step), Some(4), "{resumed:?}");
    assert_same_steps(&straight[3..], &resumed, "3 workers resumed on 2", |_| 1e-5);
    let diff = max_abs_diff(
        &latest_weights(&tmp.path().join("three")),
        &latest_weights(&tmp.path().join("two")),
    );
    assert!(diff <= 1e-5, "the resumed run ends {diff} away");
}
