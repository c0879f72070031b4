//! One job across three hosts: the coordinator in one network namespace, a worker in each of
//! two others, each host with its own address on a bridge, joined with `launcher: external`
//! over the network. Then the failures a cluster has: a stranger with the wrong token, a host
//! whose link is cut, a host that does not see the shared storage.

mod common;
use common::netns::Hosts;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PORT: u16 = 29500;
const HEARTBEAT_TIMEOUT_S: u64 = 4;

/// The tiny example as an external-launcher job listening on host 0.
fn job(dir: &Path, steps: u64, every: u64) -> std::path::PathBuf {
    tiny_example(dir);
    std::fs::write(dir.join("job.token"), "multi-host-secret\n").unwrap();
    let coordinator = Hosts::address_of(0);
    let text = format!(
        "job:
  name: multi-host
  seed: 1234
cluster:
  launcher: external
  world_size: 2
  listen: {coordinator}:{PORT}
  token_file: job.token
  threads_per_worker: 1    # the three \"hosts\" share this machine's cores
  heartbeat_interval_s: 0.5
  heartbeat_timeout_s: {HEARTBEAT_TIMEOUT_S}
  collective_timeout_s: 30
  rendezvous_timeout_s: 90
  max_restarts: 0    # the link-cut test checks detection; recovery is tested in recovery.rs
model:
  path: base
data:
  train: data/train.jsonl
  eval: data/eval.jsonl
  seq_len: 160
  eval_max_sequences: 32
training:
  steps: {steps}
  micro_batch_size: 8
  lr: 3.0e-3
  min_lr: 3.0e-4
  warmup_steps: 5
  weight_decay: 0.1
  betas: [0.9, 0.95]
  log_every_steps: 5
checkpoint:
  dir: out
  every_steps: {every}
"
    );
    let path = dir.join("multi.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn coordinator(hosts: &Hosts, config: &Path, tag: &str) -> Launch {
    let mut cmd = hosts.command(0, &bin("coordinator"));
    cmd.arg("launch").arg(config);
    Launch::spawn_tagged(cmd, tag)
}

/// `worker run` on host `i` under the host name `name`, with the job's token file.
fn worker(hosts: &Hosts, i: usize, name: &str, dir: &Path, tag: &str) -> Launch {
    let mut cmd = hosts.command(i, &bin("worker"));
    cmd.args(["run", "--coordinator", &url(), "--host", name])
        .arg("--token-file")
        .arg(dir.join("job.token"))
        .env_remove(TOKEN_ENV);
    Launch::spawn_tagged(cmd, tag)
}

fn url() -> String {
    format!("http://{}:{PORT}", Hosts::address_of(0))
}

const TOKEN_ENV: &str = "FERROTUNE_JOB_TOKEN";

/// The coordinator of [`job`] on host 0, once it accepts workers; with the tag every process
/// of the test shares.
fn started(hosts: &Hosts, dir: &Path, steps: u64, every: u64) -> (Launch, String) {
    let config = job(dir, steps, every);
    let tag = unique_tag();
    let mut run = coordinator(hosts, &config, &tag);
    let line = run.wait_for_line(Duration::from_secs(120), |l| {
        l.starts_with("workers dial: ")
    });
    assert_eq!(line, format!("workers dial: {}", url()));
    (run, tag)
}

#[test]
fn the_tiny_example_trains_across_three_hosts() {
    let _serial = serial();
    let Some(hosts) = Hosts::new(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (mut run, tag) = started(&hosts, tmp.path(), 60, 30);

    // A stranger without the token is refused in one line; the rendezvous goes on.
    let mut stranger = hosts.command(2, &bin("worker"));
    stranger
        .args(["run", "--coordinator", &url(), "--host", "intruder"])
        .env(TOKEN_ENV, "guessed");
    let mut stranger = Launch::spawn_tagged(stranger, &tag);
    let status = stranger.wait(Duration::from_secs(30));
    let said = stranger.stderr_text();
    assert_eq!(status.code(), Some(2), "{said}");
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{said}");
    assert!(errors[0].contains("missing or wrong job token"), "{said}");
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "the coordinator must keep waiting"
    );

    // Host names decide rank order, not who registered first.
    let mut b = worker(&hosts, 1, "node-b", tmp.path(), &tag);
    let mut a = worker(&hosts, 2, "node-a", tmp.path(), &tag);
    let status = run.wait(Duration::from_secs(300));
    let out = run.stdout_text();
    assert!(status.success(), "{out}\n{}", run.stderr_text());
    assert!(
        out.contains(&format!(
            "rank 0: worker node-a:0 on host node-a (collective {}:",
            Hosts::address_of(2)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "rank 1: worker node-b:0 on host node-b (collective {}:",
            Hosts::address_of(1)
        )),
        "{out}"
    );
    assert!(run.stderr_text().contains("refused a call from 10.77.0.3:"));
    for w in [&mut a, &mut b] {
        let status = w.wait(Duration::from_secs(30));
        assert!(status.success(), "{}", w.stderr_text());
    }
    let last = tmp.path().join("out/step-00000060");
    assert!(last.join("manifest.json").is_file(), "{out}");
    let continued = stdout_of(
        Command::new(bin("worker"))
            .args(["generate", "--max-new-tokens", "8", "--prompt", "Pump"])
            .arg("--model")
            .arg(&last),
    );
    assert!(!continued.trim().is_empty());
    assert!(wait_no_tagged(&tag, Duration::from_secs(5)).is_empty());
}

#[test]
fn cutting_a_hosts_link_fails_the_job_naming_rank_and_host() {
    let _serial = serial();
    let Some(hosts) = Hosts::new(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (mut run, tag) = started(&hosts, tmp.path(), 100_000, 0);
    let mut b = worker(&hosts, 1, "node-b", tmp.path(), &tag);
    let mut a = worker(&hosts, 2, "node-a", tmp.path(), &tag);
    run.wait_for_line(Duration::from_secs(120), |l| l.starts_with("step "));

    hosts.cut(2);
    let cut_at = Instant::now();
    let status = run.wait(Duration::from_secs(60));
    let took = cut_at.elapsed();
    let err = run.stderr_text();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        took < Duration::from_secs(HEARTBEAT_TIMEOUT_S + 4),
        "the coordinator took {took:?} to give up"
    );
    assert!(
        err.contains(
            "job failed: rank 0 (worker node-a:0 on host node-a) sent no heartbeat for 4s"
        ),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // Both workers end by themselves: the connected one is told to abort, the cut-off one gives
    // up on the coordinator after the heartbeat timeout.
    let left = wait_no_tagged(&tag, Duration::from_secs(20));
    assert!(left.is_empty(), "processes left behind: {left:?}");
    eprintln!("the coordinator gave up {took:?} after the cut");
    // Exit code 3: stopped by, or cut off from, the coordinator.
    assert_eq!(b.wait(Duration::from_secs(1)).code(), Some(3));
    assert!(
        b.stderr_text()
            .contains("the coordinator ended the job: the job is over"),
        "the connected worker hears it in the drain:\n{}",
        b.stderr_text()
    );
    assert_eq!(a.wait(Duration::from_secs(1)).code(), Some(3));
    assert!(
        a.stderr_text()
            .contains("no contact with the coordinator for 4s"),
        "{}",
        a.stderr_text()
    );
}

#[test]
fn a_host_that_cannot_see_the_shared_storage_fails_naming_host_and_path() {
    let _serial = serial();
    let Some(hosts) = Hosts::new(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (mut run, tag) = started(&hosts, tmp.path(), 60, 0);
    let _b = worker(&hosts, 1, "node-b", tmp.path(), &tag);
    // node-a's mount namespace has an empty directory where the data should be.
    let data = tmp.path().join("data");
    let mut cmd = hosts.command(2, Path::new("unshare"));
    cmd.args(["--mount", "sh", "-c"])
        .arg(r#"mount -t tmpfs none "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(&data)
        .arg(bin("worker"))
        .args(["run", "--coordinator", &url(), "--host", "node-a"])
        .arg("--token-file")
        .arg(tmp.path().join("job.token"));
    let mut a = Launch::spawn_tagged(cmd, &tag);

    let status = run.wait(Duration::from_secs(60));
    let err = run.stderr_text();
    assert_eq!(status.code(), Some(1), "{err}");
    let train = data.join("train.jsonl");
    let expected = format!(
        "job failed: rank 0 (worker node-a:0 on host node-a) failed: host node-a cannot read dataset train {}",
        train.display()
    );
    assert!(err.contains(&expected), "{err}");
    // Exit code 2: permanent, a new attempt on this host would fail the same way.
    assert_eq!(a.wait(Duration::from_secs(20)).code(), Some(2));
    assert!(a.stderr_text().contains("host node-a cannot read"));
    let left = wait_no_tagged(&tag, Duration::from_secs(20));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
