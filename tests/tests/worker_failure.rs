//! Restarts run out: with `max_restarts: 1`, a worker killed mid-run is replaced once; killed
//! again, the coordinator stops the rest and exits non-zero within 10 s, naming the lost rank
//! and the spent restarts, and no worker process survives. Its message says how to continue,
//! and doing so resumes training after the newest committed checkpoint.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn when_restarts_run_out_a_lost_worker_fails_the_job_naming_the_rank() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let path = tmp.path().join("long.yaml");
    let job = random_model_job(2, 2, 0, 100_000, 1.0e-3, "out").replace(
        "  threads_per_worker: 1\n",
        "  threads_per_worker: 1\n  max_restarts: 1\n",
    ) + "  every_steps: 3\n";
    std::fs::write(&path, job).unwrap();
    let committed = |step: u64| {
        tmp.path()
            .join(format!("out/step-{step:08}/manifest.json"))
            .is_file()
    };
    let mut run = Launch::start(&path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !committed(3) {
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
    let kill_local_1 = |run: &Launch| {
        let workers = tagged_processes(&run.tag);
        let victim = workers
            .iter()
            .find(|(_, cmd)| cmd.contains("--worker-id local-1 "))
            .unwrap_or_else(|| panic!("no worker local-1 among {workers:?}"))
            .0;
        // SAFETY: kill(2) on a pid read from /proc a moment ago, a child of our coordinator.
        assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    };
    kill_local_1(&run);
    run.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("generation 2: all 2 workers are back")
    });
    kill_local_1(&run);
    let killed_at = Instant::now();
    let status = run.wait(Duration::from_secs(30));
    let took = killed_at.elapsed();
    let err = run.stderr_text();
    assert!(!status.success());
    assert!(
        took < Duration::from_secs(10),
        "coordinator took {took:?} to give up"
    );
    assert!(err.contains("rank 1 (worker local-1 on host "), "{err}");
    assert!(
        err.contains("no restart left: 1 of cluster.max_restarts = 1 used"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let left = wait_no_tagged(&run.tag, Duration::from_secs(3));
    assert!(left.is_empty(), "processes left behind: {left:?}");

    let hint = err
        .lines()
        .find_map(|l| l.strip_prefix("to continue from step "))
        .unwrap_or_else(|| panic!("no resume hint in:\n{err}"));
    let (step, command) = hint.split_once(": ").unwrap();
    let step: u64 = step.parse().unwrap();
    assert!(step >= 3 && step.is_multiple_of(3), "{hint}");
    assert_eq!(
        command,
        format!("coordinator launch {} --resume", path.display())
    );
    let mut resumed = Launch::start_with(&path, &["--resume"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !committed(step + 3) {
        assert!(
            Instant::now() < deadline && resumed.child.try_wait().unwrap().is_none(),
            "no checkpoint after step {step} from the resumed job:\n{}",
            resumed.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        resumed.stdout_text().contains(&format!(
            "resuming from {}",
            tmp.path().join(format!("out/step-{step:08}")).display()
        )),
        "{}",
        resumed.stdout_text()
    );
    let tag = resumed.tag.clone();
    drop(resumed);
    let left = wait_no_tagged(&tag, Duration::from_secs(10));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
