//! Workers started by someone else (`launcher: external`, as a Kubernetes Job starts them): a
//! restarted coordinator continues the job with the same command line (`resume: auto`) and
//! keeps its restart count; a group whose lost worker never comes back finishes on fewer
//! workers with the same global batch.

mod common;
use common::netns::Hosts;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "elastic-secret";
const STEPS: u64 = 160;

/// [`random_model_job`] for `world_size` workers started elsewhere, the coordinator listening
/// on `listen`.
fn external_job(dir: &Path, name: &str, world_size: u32, listen: &str, extra: &str) -> PathBuf {
    small_random_model(dir);
    let text = random_model_job(world_size, 2, 11, STEPS, 1e-2, "out")
        .replace(
            "  launcher: local\n",
            &format!(
                "  launcher: external\n  listen: {listen}\n  heartbeat_interval_s: 0.25\n  heartbeat_timeout_s: 3\n{extra}"
            ),
        )
        .replace("  dir: out\n", "  dir: out\n  every_steps: 10\n");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The final checkpoint's weights and optimizer state.
fn final_state(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let last = dir.join(format!("out/step-{STEPS:08}"));
    (
        std::fs::read(last.join("model.safetensors")).unwrap(),
        std::fs::read(last.join("training_state/optimizer.safetensors")).unwrap(),
    )
}

/// The same job, launched locally and never interrupted.
fn reference(world_size: u32) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let config = external_job(dir.path(), "reference", world_size, "127.0.0.1:1", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "  launcher: external\n  listen: 127.0.0.1:1\n",
        "  launcher: local\n",
    );
    std::fs::write(&config, text).unwrap();
    let mut run = Launch::start(&config);
    let status = run.wait(Duration::from_secs(300));
    assert!(status.success(), "{}", run.stderr_text());
    final_state(dir.path())
}

/// Waits until stdout has more than `count` lines starting with `prefix`.
fn wait_for_more(run: &mut Launch, prefix: &str, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let seen = run
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count();
        if seen > count {
            return;
        }
        assert!(
            Instant::now() < deadline && run.child.try_wait().unwrap().is_none(),
            "no new `{prefix}` line:\n{}\n{}",
            run.stdout_text(),
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(run: &Launch, prefix: &str) -> usize {
    run.stdout
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(prefix))
        .count()
}

#[test]
fn a_restarted_coordinator_continues_the_job_and_keeps_its_restart_count() {
    let _serial = serial();
    let Some(hosts) = Hosts::new(3) else { return };
    let expected = reference(2);
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("{}:29501", Hosts::address_of(0));
    let config = external_job(tmp.path(), "job", 2, &listen, "  resume: auto\n");
    let url = format!("http://{listen}");
    let tag = unique_tag();
    let coordinator = || {
        let mut cmd = hosts.command(0, &bin("coordinator"));
        cmd.arg("launch")
            .arg(&config)
            .env("FERROTUNE_JOB_TOKEN", TOKEN);
        Launch::spawn_tagged(cmd, &tag)
    };
    let worker = |host: usize, name: &str| {
        let mut cmd = hosts.command(host, &bin("worker"));
        cmd.args(["run", "--coordinator", &url, "--host", name])
            .env("FERROTUNE_JOB_TOKEN", TOKEN);
        Launch::spawn_tagged(cmd, &tag)
    };

    let mut first = coordinator();
    let mut b = worker(1, "node-b");
    let a = worker(2, "node-a");
    first.wait_for_line(Duration::from_secs(60), |l| {
        l.starts_with("checkpoint step 20 committed")
    });
    // A worker dies; as a Job controller would, a new pod with the same identity replaces it.
    let victim = a.child.id() as i32;
    // SAFETY: kill(2) on the pid of a child this test started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    drop(a);
    first.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("restart 1 of 3: ")
    });
    let _a2 = worker(2, "node-a");
    first.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("generation 2: all 2 workers are back")
    });
    let commits = count(&first, "checkpoint step ");
    wait_for_more(
        &mut first,
        "checkpoint step ",
        commits,
        Duration::from_secs(60),
    );

    // The coordinator's pod is lost. Its workers give up on it by themselves: exit 3.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert_eq!(
        b.wait(Duration::from_secs(15)).code(),
        Some(3),
        "{}",
        b.stderr_text()
    );
    assert!(
        b.stderr_text().contains("no contact with the coordinator"),
        "{}",
        b.stderr_text()
    );

    // The same command again: it continues from the newest checkpoint, counting on from 1.
    let mut second = coordinator();
    let _b2 = worker(1, "node-b");
    let _a3 = worker(2, "node-a");
    let status = second.wait(Duration::from_secs(300));
    let (out, err) = (second.stdout_text(), second.stderr_text());
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains("1 of cluster.max_restarts = 3 restarts were used by this job before"),
        "{out}"
    );
    assert!(out.contains("resuming from "), "{out}");
    assert!(
        final_state(tmp.path()) == expected,
        "the job that lost a worker and its coordinator differs from the uninterrupted run"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("out/.ferrotune-restarts"))
            .unwrap()
            .trim(),
        "1"
    );
    let left = wait_no_tagged(&tag, Duration::from_secs(20));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_worker_that_never_returns_leaves_the_job_on_fewer_workers_with_the_same_global_batch() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = external_job(
        tmp.path(),
        "shrink",
        3,
        &listen,
        "  min_workers: 2\n  rejoin_timeout_s: 3\n",
    );
    let url = format!("http://{listen}");
    let tag = unique_tag();
    let mut run = Launch::spawn_tagged(
        {
            let mut cmd = Command::new(bin("coordinator"));
            cmd.arg("launch")
                .arg(&config)
                .env("FERROTUNE_JOB_TOKEN", TOKEN);
            cmd
        },
        &tag,
    );
    run.wait_for_line(Duration::from_secs(60), |l| l.starts_with("workers dial: "));
    let workers: Vec<Launch> = (0..3)
        .map(|i| {
            let mut cmd = Command::new(bin("worker"));
            cmd.args(["run", "--coordinator", &url, "--host", "h"])
                .args(["--local-index", &i.to_string(), "--bind", "127.0.0.1"])
                .env("FERROTUNE_JOB_TOKEN", TOKEN);
            Launch::spawn_tagged(cmd, &tag)
        })
        .collect();
    run.wait_for_line(Duration::from_secs(60), |l| {
        l.starts_with("checkpoint step 10 committed")
    });
    let victim = workers[2].child.id() as i32;
    // SAFETY: kill(2) on the pid of a child this test started.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let status = run.wait(Duration::from_secs(300));
    let (out, err) = (run.stdout_text(), run.stderr_text());
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains("continuing on 2 of 3 workers")
            && out.contains("the global batch stays the same (gradient accumulation 2 -> 3)"),
        "{out}"
    );
    let last = tmp.path().join(format!("out/step-{STEPS:08}"));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(last.join("training_state/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2, "{state}");
    assert_eq!(state["global_batch_sequences"], 12, "{state}");
    let left = wait_no_tagged(&tag, Duration::from_secs(20));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_host_cut_off_the_network_is_replaced_and_the_job_completes_identically() {
    let _serial = serial();
    let Some(hosts) = Hosts::new(4) else { return };
    let expected = reference(2);
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("{}:29502", Hosts::address_of(0));
    let config = external_job(tmp.path(), "job", 2, &listen, "");
    let url = format!("http://{listen}");
    let tag = unique_tag();
    let mut cmd = hosts.command(0, &bin("coordinator"));
    cmd.arg("launch")
        .arg(&config)
        .env("FERROTUNE_JOB_TOKEN", TOKEN);
    let mut run = Launch::spawn_tagged(cmd, &tag);
    let worker = |host: usize, name: &str| {
        let mut cmd = hosts.command(host, &bin("worker"));
        cmd.args(["run", "--coordinator", &url, "--host", name])
            .env("FERROTUNE_JOB_TOKEN", TOKEN);
        Launch::spawn_tagged(cmd, &tag)
    };
    let _b = worker(1, "node-b");
    let mut a = worker(2, "node-a");
    run.wait_for_line(Duration::from_secs(60), |l| {
        l.starts_with("checkpoint step 20 committed")
    });
    hosts.cut(2);
    let line = run.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("restart 1 of 3: ")
    });
    assert!(
        line.contains("rank 0 (worker node-a:0 on host node-a) sent no heartbeat for 3s"),
        "{line}"
    );
    // node-a's pod comes back on another machine, under the same identity.
    let _a2 = worker(3, "node-a");
    let status = run.wait(Duration::from_secs(300));
    let (out, err) = (run.stdout_text(), run.stderr_text());
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "rank 0: worker node-a:0 on host node-a (collective {}:",
            Hosts::address_of(3)
        )),
        "{out}"
    );
    assert!(
        final_state(tmp.path()) == expected,
        "the job that lost a host differs from the uninterrupted run"
    );
    // The cut-off worker gave up on the coordinator by itself.
    assert_eq!(a.wait(Duration::from_secs(15)).code(), Some(3));
    let left = wait_no_tagged(&tag, Duration::from_secs(20));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
