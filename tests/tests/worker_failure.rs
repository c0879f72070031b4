//! A worker killed mid-run: the coordinator stops the rest and exits non-zero within 10 s,
//! naming the lost rank, and no worker process survives.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn killing_a_worker_fails_the_job_naming_the_rank() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let path = tmp.path().join("long.yaml");
    std::fs::write(&path, random_model_job(2, 2, 0, 100_000, 1.0e-3, "out")).unwrap();
    let mut run = Launch::start(&path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.stdout_text().contains("step ") {
        assert!(
            Instant::now() < deadline,
            "training never started:\n{}",
            run.stderr_text()
        );
        assert!(
            run.child.try_wait().unwrap().is_none(),
            "coordinator exited early:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers = tagged_processes(&run.tag);
    let victim = workers
        .iter()
        .find(|(_, cmd)| cmd.contains("--worker-id local-1 "))
        .unwrap_or_else(|| panic!("no worker local-1 among {workers:?}"))
        .0;
    // SAFETY: kill(2) on a pid read from /proc a moment ago, a child of our coordinator.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let status = run.wait(Duration::from_secs(30));
    let took = killed_at.elapsed();
    let err = run.stderr_text();
    assert!(!status.success());
    assert!(
        took < Duration::from_secs(10),
        "coordinator took {took:?} to give up"
    );
    assert!(
        err.contains("rank 1 (worker local-1) was killed by signal 9"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let left = wait_no_tagged(&run.tag, Duration::from_secs(3));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
