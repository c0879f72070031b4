//! A lost worker costs a restart, not the job: SIGKILLed at random moments (and, through fault
//! injection, provably inside a gradient all-reduce and in the middle of a checkpoint write) or
//! frozen with SIGSTOP, the job re-forms its group by itself, the survivors stay the same
//! processes, and the result is byte-identical to a run that never failed.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STEPS: u64 = 12;

fn write_config(dir: &Path, name: &str, extra_cluster: &str) -> PathBuf {
    let text = random_model_job(2, 2, 5, STEPS, 1e-2, name)
        .replace(
            "  threads_per_worker: 1\n",
            &format!("  threads_per_worker: 1\n{extra_cluster}"),
        )
        .replace(
            &format!("  dir: {name}\n"),
            &format!("  dir: {name}\n  every_steps: 3\n"),
        )
        // Steps of ~30 ms rather than ~8: a kill "after step N + a pause" must land while the
        // job still trains (at 8 ms a step, the last 7 steps could be over before it).
        .replace("  seq_len: 32\n", "  seq_len: 128\n");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The final checkpoint's weights and optimizer state.
fn final_state(root: &Path) -> (Vec<u8>, Vec<u8>) {
    let last = root.join(format!("step-{STEPS:08}"));
    (
        std::fs::read(last.join("model.safetensors")).unwrap(),
        std::fs::read(last.join("training_state/optimizer.safetensors")).unwrap(),
    )
}

/// (generation, pid) of every "joined the job" line in a worker's log.
fn joins(log: &Path) -> Vec<(u64, u32)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    text.lines()
        .filter(|l| l.contains("joined the job"))
        .filter_map(|l| Some((field(l, "generation=")?, field(l, "pid=")? as u32)))
        .collect()
}

/// Checks what every recovered run must show; returns its output.
fn check_recovered(
    launch: &mut Launch,
    root: &Path,
    victim: usize,
    reference: &(Vec<u8>, Vec<u8>),
) {
    let status = launch.wait(Duration::from_secs(120));
    let (out, err) = (launch.stdout_text(), launch.stderr_text());
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("restart 1 of 3: "), "{out}");
    assert!(
        out.contains("generation 2: all 2 workers are back"),
        "{out}"
    );
    assert!(
        final_state(root) == *reference,
        "the recovered run differs from the uninterrupted one:\n{out}"
    );
    let survivor = 1 - victim;
    let seen = joins(&root.join(format!("logs/worker-{survivor}.log")));
    assert!(seen.len() >= 2, "the survivor joined {seen:?}");
    assert!(
        seen.iter().all(|(_, pid)| *pid == seen[0].1),
        "the survivor must stay the same process across generations: {seen:?}"
    );
    let replaced = joins(&root.join(format!("logs/worker-{victim}.log")));
    assert!(
        replaced.iter().any(|(_, pid)| *pid != replaced[0].1),
        "the victim was replaced by a new process: {replaced:?}"
    );
    let staging: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging"))
        .collect();
    assert!(
        staging.is_empty(),
        "uncommitted staging left behind: {staging:?}"
    );
    let left = wait_no_tagged(&launch.tag, Duration::from_secs(10));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// A small seeded generator (xorshift): the trials are the same on every run.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

enum Trial {
    /// Killed by the worker itself at a fault-injection point.
    Fault { point: &'static str },
    /// Killed by this test once the coordinator has printed step `after`.
    Random,
}

#[test]
fn workers_killed_at_random_moments_cost_a_restart_and_change_nothing() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let reference_config = write_config(tmp.path(), "reference", "");
    let mut reference = Launch::start(&reference_config);
    assert!(reference.wait(Duration::from_secs(120)).success());
    let reference = final_state(&tmp.path().join("reference"));

    let trials = [
        Trial::Fault { point: "allreduce" },
        Trial::Fault {
            point: "checkpoint_write",
        },
        Trial::Random,
        Trial::Random,
        Trial::Fault { point: "allreduce" },
    ];
    let mut draw = Draw(0x5eed_2026);
    let mut hit = Vec::new();
    for (i, trial) in trials.iter().enumerate() {
        let name = format!("trial{i}");
        let config = write_config(tmp.path(), &name, "");
        let root = tmp.path().join(&name);
        let marker = tmp.path().join(format!("{name}.fault"));
        let mut cmd = Command::new(bin("coordinator"));
        cmd.arg("launch").arg(&config);
        let victim = match trial {
            Trial::Fault { point } => {
                // Only rank 0 writes checkpoints (at steps 3, 6, 9).
                let (rank, step) = if *point == "checkpoint_write" {
                    (0, 3 * (1 + draw.below(3)))
                } else {
                    (draw.below(2), 2 + draw.below(STEPS - 3))
                };
                cmd.env(
                    "FERROTUNE_TEST_FAULT",
                    format!("{point}:{rank}:{step}:{}", marker.display()),
                );
                rank as usize
            }
            Trial::Random => draw.below(2) as usize,
        };
        let mut launch = Launch::spawn(cmd);
        if let Trial::Random = trial {
            let after = 1 + draw.below(STEPS - 4);
            let pause = Duration::from_millis(draw.below(40));
            let prefix = format!("step {after:>5}/{STEPS}");
            // The victim's pid before the moment comes: scanning /proc takes tens of
            // milliseconds, as long as a few steps of this job.
            launch.wait_for_line(Duration::from_secs(60), |l| l.starts_with("rank 1: "));
            let pid = tagged_processes(&launch.tag)
                .into_iter()
                .find(|(_, cmd)| cmd.contains(&format!("--worker-id local-{victim} ")))
                .expect("the victim is running")
                .0;
            launch.wait_for_line(Duration::from_secs(60), |l| l.starts_with(&prefix));
            std::thread::sleep(pause);
            // SAFETY: kill(2) on a pid read from /proc a moment ago, a worker of this job.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            hit.push(format!(
                "random (rank {victim} after step {after} + {pause:?})"
            ));
        }
        check_recovered(&mut launch, &root, victim, &reference);
        if let Trial::Fault { point } = trial {
            let record = std::fs::read_to_string(&marker)
                .unwrap_or_else(|_| panic!("trial {i}: the {point} fault never fired"));
            assert!(record.starts_with(point), "{record}");
            hit.push(record.trim().to_string());
        }
    }
    eprintln!("trials: {hit:#?}");
    assert!(hit.iter().any(|h| h.starts_with("allreduce")));
    assert!(hit.iter().any(|h| h.starts_with("checkpoint_write")));
}

#[test]
fn a_frozen_worker_is_detected_by_its_silence_and_replaced() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let timing = "  heartbeat_interval_s: 0.25\n  heartbeat_timeout_s: 2\n";
    let reference_config = write_config(tmp.path(), "reference", timing);
    assert!(Launch::start(&reference_config)
        .wait(Duration::from_secs(120))
        .success());
    let reference = final_state(&tmp.path().join("reference"));

    let config = write_config(tmp.path(), "frozen", timing);
    let mut launch = Launch::start(&config);
    launch.wait_for_line(Duration::from_secs(60), |l| {
        l.starts_with(&format!("step     4/{STEPS}"))
    });
    let pid = tagged_processes(&launch.tag)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("--worker-id local-1 "))
        .expect("worker local-1 is running")
        .0;
    // SAFETY: kill(2) on a pid read from /proc a moment ago, a worker of this job.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    launch.wait_for_line(Duration::from_secs(30), |l| l.starts_with("restart 1 of 3"));
    let detected = stopped.elapsed();
    let out = launch.stdout_text();
    assert!(
        out.contains("rank 1 (worker local-1 on host") && out.contains("sent no heartbeat"),
        "{out}"
    );
    // The survivor was blocked in the all-reduce (collective timeout: 60 s): told to rejoin,
    // it breaks its ring at once.
    launch.wait_for_line(Duration::from_secs(20), |l| {
        l.starts_with("generation 2: all 2 workers are back")
    });
    let recovered = stopped.elapsed();
    eprintln!("frozen worker detected after {detected:?}, group back after {recovered:?}");
    assert!(recovered < Duration::from_secs(15), "{recovered:?}");
    check_recovered(&mut launch, &tmp.path().join("frozen"), 1, &reference);
}
