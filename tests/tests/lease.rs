//! One coordinator per checkpoint directory: a second `launch` on a live job's directory is
//! refused before it touches anything, and the live job ends as if it had run alone; a frozen
//! coordinator's lease is taken over once it expires, and the frozen one, when it wakes up,
//! stops without committing.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// The files a finished job leaves in its final checkpoint, by name.
fn final_state(root: &Path) -> Vec<(String, Vec<u8>)> {
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    let dir = root.join(latest.trim());
    [
        "model.safetensors",
        "training_state/optimizer.safetensors",
        "training_state/trainer_state.json",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
    .collect()
}

fn job(dir: &Path, name: &str, out: &str, extra_cluster: &str, lease_s: u32) -> std::path::PathBuf {
    let text = random_model_job(1, 2, 7, 40, 1e-2, out)
        .replace(
            "  threads_per_worker: 1\n",
            &format!("  threads_per_worker: 1\n{extra_cluster}"),
        )
        .replace(
            &format!("  dir: {out}\n"),
            &format!("  dir: {out}\n  every_steps: 10\n  lease_timeout_s: {lease_s}\n"),
        );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn run_alone(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let solo = job(dir, "solo", "solo", "", 30);
    let mut run = Launch::start(&solo);
    assert!(
        run.wait(Duration::from_secs(120)).success(),
        "{}",
        run.stderr_text()
    );
    final_state(&dir.join("solo"))
}

#[test]
fn a_second_launch_on_a_live_jobs_directory_is_refused_naming_the_owner() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let config = job(tmp.path(), "shared", "shared", "", 30);
    let mut first = Launch::start(&config);
    first.wait_for_line(Duration::from_secs(60), |l| l.starts_with("workers dial:"));

    let mut second = Launch::start(&config);
    let status = second.wait(Duration::from_secs(30));
    let err = second.stderr_text();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("is in use by job random-model")
            && err.contains(&format!("coordinator pid {}", first.child.id())),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
    assert!(
        !second.stdout_text().contains("workers dial"),
        "the refused launch started serving"
    );

    let status = first.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", first.stderr_text());
    assert!(
        !tmp.path().join("shared/.ferrotune-lease.json").exists(),
        "a finished job gives its directory up"
    );
    assert_eq!(
        final_state(&tmp.path().join("shared")),
        run_alone(tmp.path()),
        "the job with a refused intruder ends byte-identical to one that ran alone"
    );
}

#[test]
fn a_frozen_coordinators_lease_is_taken_over_and_it_stops_when_it_wakes() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    // Workers that would wait out a long freeze, so that only the lease decides.
    let patient = "  heartbeat_timeout_s: 120\n";
    let config = job(tmp.path(), "shared", "shared", patient, 2);
    let mut frozen = Launch::start(&config);
    frozen.wait_for_line(Duration::from_secs(60), |l| l.starts_with("workers dial:"));
    let pid = frozen.child.id() as i32;
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(pid, libc::SIGSTOP) };

    let mut early = Launch::start(&config);
    assert_eq!(
        early.wait(Duration::from_secs(30)).code(),
        Some(2),
        "a fresh lease of a live (if frozen) coordinator: {}",
        early.stderr_text()
    );
    std::thread::sleep(Duration::from_millis(2500));
    let mut taker = Launch::start(&config);
    let status = taker.wait(Duration::from_secs(120));
    assert!(status.success(), "{}", taker.stderr_text());
    assert!(
        taker.stderr_text().contains("taking over the lease"),
        "{}",
        taker.stderr_text()
    );
    let taken = final_state(&tmp.path().join("shared"));

    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let status = frozen.wait(Duration::from_secs(60));
    let err = frozen.stderr_text();
    assert_eq!(status.code(), Some(1), "{err}");
    // The new owner may have finished and released the directory by now.
    assert!(err.contains("was taken over by"), "{err}");
    assert_eq!(
        final_state(&tmp.path().join("shared")),
        taken,
        "the woken coordinator committed nothing over the new owner's checkpoints"
    );
    assert_eq!(taken, run_alone(tmp.path()));
}
