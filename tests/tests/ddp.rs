//! Data parallelism changes nothing but speed: 2 workers × micro-batch b end with the same
//! parameters as 1 worker × micro-batch 2b over the same samples.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn train(
    dir: &Path,
    name: &str,
    world_size: u32,
    micro_batch: u32,
    seed: u64,
) -> BTreeMap<String, Vec<f32>> {
    train_with(dir, name, world_size, micro_batch, seed, "fp32")
}

fn train_with(
    dir: &Path,
    name: &str,
    world_size: u32,
    micro_batch: u32,
    seed: u64,
    precision: &str,
) -> BTreeMap<String, Vec<f32>> {
    let path = dir.join(format!("{name}.yaml"));
    let job = random_model_job(world_size, micro_batch, seed, 4, 1.0e-2, name).replace(
        "  init: random\n",
        &format!("  init: random\n  precision: {precision}\n"),
    );
    std::fs::write(&path, job).unwrap();
    let mut run = Launch::start(&path);
    let status = run.wait(Duration::from_secs(120));
    assert!(
        status.success(),
        "{name} failed:\n{}\n{}",
        run.stdout_text(),
        run.stderr_text()
    );
    latest_weights(&dir.join(name))
}

#[test]
fn two_workers_equal_one_worker_with_twice_the_micro_batch() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let ddp = train(tmp.path(), "ddp", 2, 2, 3);
    let single = train(tmp.path(), "single", 1, 4, 3);
    let diff = max_abs_diff(&ddp, &single);
    assert!(diff <= 1e-5, "2 × b and 1 × 2b differ by {diff}");
    // AdamW and clipping would hide a constant factor on the gradients (a sum where a mean is
    // meant): the norms before clipping must agree as well.
    let (ddp_steps, single_steps) = (
        step_history(&tmp.path().join("ddp")),
        step_history(&tmp.path().join("single")),
    );
    assert_eq!(ddp_steps.len(), 4);
    for (a, b) in ddp_steps.iter().zip(&single_steps) {
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-5 * b.grad_norm,
            "step {}: grad_norm {} with 2 workers, {} with 1",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
        assert!((a.loss - b.loss).abs() <= 1e-5 * b.loss, "{a:?} vs {b:?}");
    }

    // The comparison is sensitive: same seed and initial weights, but half the global batch
    // (so other samples per step), ends clearly elsewhere.
    let other = train(tmp.path(), "other", 1, 2, 3);
    let moved = max_abs_diff(&single, &other);
    assert!(
        moved > 1e-3,
        "a different data order changed parameters by only {moved}"
    );
    eprintln!(
        "max |2 workers x b - 1 worker x 2b| = {diff:e}; half the batch moves weights by {moved:e}"
    );
}

fn mean_abs_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    let (sum, n) = a
        .iter()
        .flat_map(|(k, va)| va.iter().zip(&b[k]).map(|(x, y)| (x - y).abs() as f64))
        .fold((0.0, 0usize), |(s, n), d| (s + d, n + 1));
    sum / n as f64
}

/// `model.precision: bf16` trains through bf16 compute weights on every rank and still saves
/// fp32 master weights (checked in `train_with`): its weights differ from fp32 training's, but
/// far less than a different data order moves them.
#[test]
fn bf16_compute_job_saves_fp32_masters_close_to_fp32_training() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let fp32 = train_with(tmp.path(), "fp32", 2, 2, 3, "fp32");
    let bf16 = train_with(tmp.path(), "bf16", 2, 2, 3, "bf16");
    let other = train_with(tmp.path(), "other", 1, 2, 3, "fp32");
    let (rounding, order) = (mean_abs_diff(&fp32, &bf16), mean_abs_diff(&fp32, &other));
    eprintln!("mean |bf16 compute - fp32| = {rounding:e}; another data order: {order:e}");
    assert!(rounding > 0.0, "bf16 compute changed nothing: was it used?");
    assert!(
        rounding < 0.5 * order,
        "bf16 compute drifted {rounding} from fp32, another data order {order}"
    );
}
