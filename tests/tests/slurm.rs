//! `launcher: slurm` on a real Slurm cluster: Debian's slurmctld, two slurmd nodes (n1, n2) and
//! munge, started by `tests/infra/slurm-cluster.sh` for each test and stopped after it. Jobs are
//! submitted with the very script users start from, `deploy/slurm/ferrotune.sbatch`.

mod common;
use common::netns::{is_root, prerequisite};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Cluster {
    /// None when the test must be skipped (no Slurm and no root to install it, outside CI).
    fn start() -> Option<Cluster> {
        let installed = ["slurmctld", "slurmd", "munged", "sbatch"].iter().all(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !prerequisite(
            installed || is_root(),
            "Slurm is not installed and installing it needs root",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(repo_root().join("tests/infra/slurm-cluster.sh"))
            .arg("start")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "starting Slurm failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.path().join("slurm.conf");
        Some(Cluster { dir, conf })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// `sbatch deploy/slurm/ferrotune.sbatch CONFIG` from `workdir`; returns the job id.
    /// `env` is added to the job's environment (sbatch and srun pass it on to every task).
    fn submit(&self, workdir: &Path, config: &Path, tag: &str, env: &[(&str, String)]) -> String {
        let bin_dir = bin("coordinator").parent().unwrap().to_path_buf();
        let mut cmd = self.command("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--chdir={}", workdir.display()))
            .arg(repo_root().join("deploy/slurm/ferrotune.sbatch"))
            .arg(config)
            .env("FERROTUNE_BIN", bin_dir)
            .env("FERROTUNE_TEST_TAG", tag)
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        stdout_of(&mut cmd).trim().to_string()
    }

    /// Writes `config_text` into `workdir` and submits it; returns (job id, its output file, the
    /// tag its processes carry).
    fn submit_text(&self, workdir: &Path, config_text: &str) -> (String, PathBuf, String) {
        self.submit_text_env(workdir, config_text, &[])
    }

    fn submit_text_env(
        &self,
        workdir: &Path,
        config_text: &str,
        env: &[(&str, String)],
    ) -> (String, PathBuf, String) {
        let config = workdir.join("slurm.yaml");
        std::fs::write(&config, config_text).unwrap();
        let tag = unique_tag();
        let id = self.submit(workdir, &config, &tag, env);
        let output = workdir.join(format!("ferrotune-{id}.out"));
        (id, output, tag)
    }

    /// `scontrol show job ID` as key=value pairs.
    fn job(&self, id: &str) -> Vec<(String, String)> {
        let text = stdout_of(self.command("scontrol").args(["show", "job", id]));
        text.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn field(&self, id: &str, key: &str) -> String {
        self.job(id)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// Polls until the job has ended; returns (JobState, ExitCode).
    fn wait(&self, id: &str, limit: Duration, output: &Path) -> (String, String) {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.field(id, "JobState");
            let ended = !matches!(
                state.as_str(),
                "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"
            );
            if ended {
                return (state, self.field(id, "ExitCode"));
            }
            if Instant::now() > deadline {
                let _ = self.command("scancel").arg(id).status();
                panic!(
                    "job {id} still {state} after {limit:?}; output:\n{}",
                    std::fs::read_to_string(output).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("tests/infra/slurm-cluster.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// The job as users write it for Slurm: `launcher: slurm`, and `world_size: auto` takes the
/// allocation's task count.
fn slurm_job(text: &str) -> String {
    let replaced = text.replace(
        "  launcher: local\n  world_size: 2\n",
        "  launcher: slurm\n  world_size: auto\n",
    );
    assert_ne!(replaced, text, "the cluster section edit did not apply");
    replaced
}

#[test]
fn the_sbatch_script_trains_the_tiny_example_on_two_nodes() {
    let _serial = serial();
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(tiny_example(tmp.path())).unwrap();
    let (id, output, tag) = cluster.submit_text(tmp.path(), &slurm_job(&text));
    let (state, exit) = cluster.wait(&id, Duration::from_secs(300), &output);
    let out = std::fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(
        (state.as_str(), exit.as_str()),
        ("COMPLETED", "0:0"),
        "{out}"
    );
    // One task per node, ranks in node order, each worker on its own node.
    assert!(
        out.contains(&format!("rank 0: worker {id}.0 on host n1 ")),
        "{out}"
    );
    assert!(
        out.contains(&format!("rank 1: worker {id}.1 on host n2 ")),
        "{out}"
    );
    let last = tmp.path().join("runs/checkpoints/step-00000060");
    assert!(last.join("manifest.json").is_file(), "{out}");
    assert!(
        out.contains(&format!("final checkpoint: {}", last.display())),
        "{out}"
    );
    let left = wait_no_tagged(&tag, Duration::from_secs(10));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_killed_task_is_replaced_by_a_new_step_and_the_job_completes() {
    let _serial = serial();
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let text = random_model_job(2, 2, 0, 30, 1.0e-3, "out") + "  every_steps: 5\n";
    // Task 1 kills itself inside the all-reduce of step 12, once (the marker disarms it).
    let marker = tmp.path().join("fault");
    let fault = format!("allreduce:1:12:{}", marker.display());
    let (id, output, tag) = cluster.submit_text_env(
        tmp.path(),
        &slurm_job(&text),
        &[("FERROTUNE_TEST_FAULT", fault)],
    );
    let (state, exit) = cluster.wait(&id, Duration::from_secs(180), &output);
    let out = std::fs::read_to_string(&output).unwrap_or_default();
    // The allocation was never given up: the batch script ran to its successful end.
    assert_eq!(
        (state.as_str(), exit.as_str()),
        ("COMPLETED", "0:0"),
        "{out}"
    );
    assert!(marker.is_file(), "the fault never fired:\n{out}");
    assert!(
        out.contains(&format!(
            "restart 1 of 3: rank 1 (worker {id}.1 on host n2)"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("(replacing {id}.1)")), "{out}");
    assert!(
        out.contains("generation 2: all 2 workers are back; training continues from step-"),
        "{out}"
    );
    assert!(
        out.contains(&format!("rank 1: worker {id}.1 on host n2 ")),
        "the replacement runs in the failed task's place:\n{out}"
    );
    assert!(
        tmp.path().join("out/step-00000030/manifest.json").is_file(),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
    let left = wait_no_tagged(&tag, Duration::from_secs(15));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_frozen_task_is_replaced_and_gone_while_the_job_still_runs() {
    let _serial = serial();
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    small_random_model(tmp.path());
    let text = random_model_job(2, 2, 0, 400, 1.0e-3, "out").replace(
        "  threads_per_worker: 1\n",
        "  threads_per_worker: 1\n  heartbeat_interval_s: 0.25\n  heartbeat_timeout_s: 2\n",
    ) + "  every_steps: 50\n";
    let (id, output, tag) = cluster.submit_text(tmp.path(), &slurm_job(&text));
    let deadline = Instant::now() + Duration::from_secs(120);
    let worker = bin("worker");
    let victim = loop {
        let out = std::fs::read_to_string(&output).unwrap_or_default();
        if out.lines().any(|l| l.starts_with("step ")) {
            let task = format!("--worker-id {id}.1 ");
            let found = tagged_processes(&tag).into_iter().find(|(_, cmd)| {
                cmd.starts_with(&*worker.to_string_lossy()) && cmd.contains(&task)
            });
            break found.unwrap_or_else(|| panic!("no worker {id}.1 among the tagged processes"));
        }
        assert!(
            Instant::now() < deadline,
            "training never started; output:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: kill(2) on a pid read from /proc a moment ago: a worker task of our job.
    assert_eq!(unsafe { libc::kill(victim.0, libc::SIGSTOP) }, 0);
    // Once the group is back, the frozen task is gone while the job still runs: it must not
    // linger, stopped, holding its CPUs. (Killing its srun is enough: Slurm then ends the
    // step's tasks, SIGKILL reaching a stopped process too.)
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&output)
        .unwrap_or_default()
        .contains("generation 2: all 2 workers are back")
    {
        assert!(Instant::now() < deadline, "the group never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(victim.0) {
        assert!(
            Instant::now() < deadline,
            "the frozen task {} is still there 10 s after its replacement joined",
            victim.0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        cluster.field(&id, "JobState"),
        "RUNNING",
        "checked while the job runs"
    );
    let (state, exit) = cluster.wait(&id, Duration::from_secs(180), &output);
    let out = std::fs::read_to_string(&output).unwrap_or_default();
    assert_eq!(
        (state.as_str(), exit.as_str()),
        ("COMPLETED", "0:0"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "restart 1 of 3: rank 1 (worker {id}.1 on host n2) sent no heartbeat"
        )),
        "{out}"
    );
    let left = wait_no_tagged(&tag, Duration::from_secs(15));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_world_size_the_allocation_cannot_hold_is_refused_before_anything_starts() {
    let _serial = serial();
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(tiny_example(tmp.path())).unwrap();
    let three = slurm_job(&text).replace("world_size: auto", "world_size: 3");
    let (id, output, _) = cluster.submit_text(tmp.path(), &three);
    let (state, exit) = cluster.wait(&id, Duration::from_secs(60), &output);
    let out = std::fs::read_to_string(&output).unwrap_or_default();
    assert_eq!((state.as_str(), exit.as_str()), ("FAILED", "2:0"), "{out}");
    assert!(
        out.contains(
            "cluster.world_size is 3, but the allocation holds 2 tasks (1,1 per node on n1,n2)"
        ),
        "{out}"
    );
    assert!(out.contains("hint: "), "{out}");
    assert!(
        !tmp.path().join("runs").exists(),
        "nothing may start: {out}"
    );

    // The allocation as the coordinator reads it, node list expanded by Slurm's own parser.
    std::env::set_var("SLURM_CONF", &cluster.conf);
    let env = |k: &str| {
        match k {
            "SLURM_JOB_ID" => Some("9"),
            "SLURM_JOB_NODELIST" => Some("n[1-3,7]"),
            "SLURM_TASKS_PER_NODE" => Some("2(x3),1"),
            _ => None,
        }
        .map(String::from)
    };
    use ferrotune_coordinator::launcher::slurm::Allocation;
    let a = Allocation::from_env(&env).unwrap();
    assert_eq!(a.nodes, vec!["n1", "n2", "n3", "n7"]);
    assert_eq!(a.tasks_per_node, vec![2, 2, 2, 1]);
    assert_eq!(a.capacity(), 7);
    let mismatched = |k: &str| {
        if k == "SLURM_TASKS_PER_NODE" {
            Some("2(x2)".to_string())
        } else {
            env(k)
        }
    };
    let e = Allocation::from_env(&mismatched).unwrap_err().to_string();
    assert!(e.contains("counts 2 nodes"), "{e}");
}
