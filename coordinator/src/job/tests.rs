use super::*;

fn params(world_size: u32) -> JobParams {
    JobParams {
        world_size,
        heartbeat_timeout: Duration::from_secs(10),
        rendezvous_timeout: Duration::from_secs(60),
        failure_grace: Duration::from_secs(1),
        version: "1.2.3".into(),
        tracks_exits: true,
        rejoin_timeout: Duration::from_secs(30),
        step_timeout: Duration::from_secs(600),
        // The failure tests below see the job end; restarts have tests of their own.
        max_restarts: 0,
        restarts_done: 0,
        resume_from: None,
        earlier_checkpoints: Vec::new(),
        grad_accum_steps: 2,
        min_workers: world_size,
        devices: crate::config::DeviceConfig::default(),
        gpu_need: None,
    }
}

fn worker(id: &str, host: &str, local_index: u32) -> Event {
    Event::Registered(WorkerInfo {
        worker_id: id.into(),
        host: host.into(),
        local_index,
        peer_address: format!("{host}:{}", 9000 + local_index),
        version: "1.2.3".into(),
        devices: Default::default(),
    })
}

fn assignments(actions: &[Action]) -> Vec<(String, Assignment)> {
    match actions {
        [Action::Assign(list)] => list.clone(),
        other => panic!("expected one Assign, got {other:?}"),
    }
}

/// A job with `n` workers on one host, all registered.
fn running(n: u32, t0: Instant) -> Job {
    let mut job = Job::new(params(n), t0);
    for i in 0..n {
        job.handle(worker(&format!("w{i}"), "h", i), t0);
    }
    job
}

#[test]
fn ranks_are_assigned_once_everyone_registered_ordered_by_host_then_index() {
    let t0 = Instant::now();
    let mut job = Job::new(params(3), t0);
    assert!(job.handle(worker("b1", "hostB", 1), t0).is_empty());
    assert!(job.handle(worker("a0", "hostA", 0), t0).is_empty());
    let list = assignments(&job.handle(worker("b0", "hostB", 0), t0));
    let ranks: Vec<(String, u32, u32)> = list
        .iter()
        .map(|(id, a)| (id.clone(), a.rank, a.local_rank))
        .collect();
    assert_eq!(
        ranks,
        vec![
            ("a0".into(), 0, 0),
            ("b0".into(), 1, 0),
            ("b1".into(), 2, 1)
        ]
    );
    let b1 = &list[2].1;
    assert_eq!(b1.local_world_size, 2);
    // Rank 2's next neighbour wraps around to rank 0.
    assert_eq!(b1.next_peer_address, "hostA:9000");
    assert_eq!(list[0].1.next_peer_address, "hostB:9000");
    assert_eq!(job.heartbeat_answer(1), HeartbeatAnswer::Continue);
}

#[test]
fn late_registration_is_rejected() {
    let t0 = Instant::now();
    let mut job = running(2, t0);
    let actions = job.handle(worker("extra", "h", 5), t0);
    assert!(matches!(&actions[..], [Action::Reject { worker_id, .. }] if worker_id == "extra"));
}

#[test]
fn job_succeeds_when_every_rank_finished_and_exited() {
    let t0 = Instant::now();
    let mut job = running(2, t0);
    job.handle(
        Event::CheckpointCommitted {
            step: 5,
            path: "/c/step-5".into(),
            is_final: true,
        },
        t0,
    );
    for (rank, id) in [(0, "w0"), (1, "w1")] {
        assert!(job
            .handle(
                Event::Finished {
                    rank,
                    generation: 1,
                    retriable: false,
                    ok: true,
                    error: String::new(),
                    damaged_file: None,
                },
                t0
            )
            .is_empty());
        let actions = job.handle(
            Event::WorkerExited {
                worker_id: id.into(),
                code: Some(0),
                success: true,
                status: "exited with code 0".into(),
                last_line: None,
            },
            t0,
        );
        if rank == 1 {
            assert_eq!(
                actions,
                vec![Action::Done(Outcome::Succeeded {
                    final_checkpoint: Some("/c/step-5".into())
                })]
            );
        } else {
            assert!(actions.is_empty());
        }
    }
    assert!(job.is_done());
}

#[test]
fn killed_worker_is_blamed_over_the_neighbour_that_lost_it() {
    let t0 = Instant::now();
    let mut job = running(2, t0);
    // The survivor reports first; the killed worker's exit arrives a moment later.
    let a = job.handle(
        Event::Finished {
            rank: 0,
            generation: 1,
            retriable: false,
            ok: false,
            error: "lost the connection to rank 1".into(),
            damaged_file: None,
        },
        t0,
    );
    assert!(a.is_empty(), "waits for the grace period: {a:?}");
    let a = job.handle(
        Event::WorkerExited {
            worker_id: "w1".into(),
            code: None,
            success: false,
            status: "was killed by signal 9 (SIGKILL)".into(),
            last_line: Some("step 3".into()),
        },
        t0 + Duration::from_millis(50),
    );
    // The death is the root cause: decided when it arrives, the earlier report folded in.
    match &a[..] {
        [Action::StopWorkers { .. }, Action::Done(Outcome::Failed { reason })] => {
            assert!(
                reason.starts_with("rank 1 (worker w1 on host h) was killed by signal 9"),
                "{reason}"
            );
            assert!(reason.contains("its last log line: step 3"), "{reason}");
        }
        other => panic!("expected the job to fail, got {other:?}"),
    }
    assert!(job.is_done());
}

#[test]
fn failure_is_decided_at_once_when_every_worker_is_gone() {
    let t0 = Instant::now();
    let mut job = running(1, t0);
    let a = job.handle(
        Event::WorkerExited {
            worker_id: "w0".into(),
            code: Some(1),
            success: false,
            status: "exited with code 1".into(),
            last_line: None,
        },
        t0,
    );
    assert!(
        matches!(
            &a[..],
            [
                Action::StopWorkers { .. },
                Action::Done(Outcome::Failed { .. })
            ]
        ),
        "{a:?}"
    );
}

#[test]
fn missed_heartbeats_fail_the_job() {
    let t0 = Instant::now();
    let mut job = running(2, t0);
    job.handle(
        Event::Heartbeat {
            rank: 0,
            generation: 1,
            phase: WorkerPhase::Training,
            telemetry: Default::default(),
        },
        t0 + Duration::from_secs(9),
    );
    assert!(job
        .handle(Event::Tick, t0 + Duration::from_secs(9))
        .is_empty());
    // Silence is a root cause: decided at once, without a grace period.
    let a = job.handle(Event::Tick, t0 + Duration::from_secs(11));
    match &a[..] {
        [Action::StopWorkers { reason }, Action::Done(Outcome::Failed { .. })] => {
            assert!(
                reason.contains("rank 1 (worker w1 on host h) sent no heartbeat"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn heartbeats_of_another_generation_do_not_count() {
    let t0 = Instant::now();
    let mut job = running(1, t0);
    job.handle(
        Event::Heartbeat {
            rank: 0,
            generation: 99,
            phase: WorkerPhase::Training,
            telemetry: Default::default(),
        },
        t0 + Duration::from_secs(9),
    );
    assert!(!job
        .handle(Event::Tick, t0 + Duration::from_secs(11))
        .is_empty());
}

#[test]
fn rendezvous_times_out() {
    let t0 = Instant::now();
    let mut job = Job::new(params(2), t0);
    job.handle(worker("w0", "h", 0), t0);
    let a = job.handle(Event::Tick, t0 + Duration::from_secs(61));
    match &a[..] {
        [_, Action::Done(Outcome::Failed { reason })] => {
            assert!(reason.contains("only 1 of 2 workers registered"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_rank_zero_staging_is_committed_and_interrupt_stops() {
    let t0 = Instant::now();
    let mut job = running(2, t0);
    let ready = |rank| Event::CheckpointReady {
        rank,
        generation: 1,
        step: 4,
        staging_dir: "/c/.staging-x".into(),
        is_final: false,
        files: vec![ferrotune_data::manifest::FileDigest {
            path: "model.safetensors".into(),
            bytes: 7,
            sha256: "ab".into(),
        }],
        parts: 1,
        timing: (0.1, 2.0),
    };
    // One part: only rank 0 writes checkpoints.
    assert!(matches!(
        &job.handle(ready(1), t0)[..],
        [Action::Refuse(why), Action::Discard { .. }] if why.contains("not the checkpoint writer")
    ));
    assert_eq!(
        job.handle(ready(0), t0),
        vec![Action::Commit {
            step: 4,
            staging_dir: "/c/.staging-x".into(),
            is_final: false,
            files: vec![ferrotune_data::manifest::FileDigest {
                path: "model.safetensors".into(),
                bytes: 7,
                sha256: "ab".into(),
            }],
            parts: Vec::new(),
        }]
    );
    let a = job.handle(Event::Interrupted, t0);
    assert!(matches!(
        &a[..],
        [
            Action::StopWorkers { .. },
            Action::Done(Outcome::Interrupted)
        ]
    ));
    assert_eq!(
        job.heartbeat_answer(1),
        HeartbeatAnswer::Stop("the job is stopping".into())
    );
    assert!(
        job.handle(Event::Tick, t0).is_empty(),
        "a finished job ignores further events"
    );
}

#[test]
fn a_worker_of_another_version_is_refused_and_the_rendezvous_goes_on() {
    let t0 = Instant::now();
    let mut job = Job::new(params(2), t0);
    assert!(job.handle(worker("w0", "h", 0), t0).is_empty());
    let mut stranger = worker("old", "h", 1);
    if let Event::Registered(info) = &mut stranger {
        info.version = "0.9.0".into();
    }
    match job.handle(stranger, t0).as_slice() {
        [Action::Reject { worker_id, reason }] => {
            assert_eq!(worker_id, "old");
            assert!(
                reason.contains("worker version 0.9.0 does not match coordinator version 1.2.3"),
                "{reason}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The refused worker took no place: the right one still completes the group.
    let list = assignments(&job.handle(worker("w1", "h", 1), t0));
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|(id, _)| id != "old"));
}

#[test]
fn without_exit_reports_finishing_ranks_decide_success() {
    let t0 = Instant::now();
    let mut p = params(2);
    p.tracks_exits = false;
    let mut job = Job::new(p, t0);
    job.handle(worker("a", "h1", 0), t0);
    assignments(&job.handle(worker("b", "h2", 0), t0));
    let finish = |rank| Event::Finished {
        rank,
        generation: 1,
        retriable: false,
        ok: true,
        error: String::new(),
        damaged_file: None,
    };
    assert!(job.handle(finish(0), t0).is_empty());
    assert!(matches!(
        job.handle(finish(1), t0).as_slice(),
        [Action::Done(Outcome::Succeeded { .. })]
    ));
}

#[test]
fn a_reported_failure_names_rank_worker_and_host() {
    let t0 = Instant::now();
    let mut job = Job::new(params(2), t0);
    job.handle(worker("a", "node-a", 0), t0);
    job.handle(worker("b", "node-b", 0), t0);
    let failed = Event::Finished {
        rank: 1,
        generation: 1,
        retriable: false,
        ok: false,
        error: "host node-b cannot read data.train /x".into(),
        damaged_file: None,
    };
    assert!(job.handle(failed, t0).is_empty(), "reports gather first");
    let later = t0 + Duration::from_secs(2);
    match job.handle(Event::Tick, later).as_slice() {
        [Action::StopWorkers { .. }, Action::Done(Outcome::Failed { reason })] => assert_eq!(
            reason,
            "rank 1 (worker b on host node-b) failed: host node-b cannot read data.train /x"
        ),
        other => panic!("expected failure, got {other:?}"),
    }
}

#[test]
fn hosts_with_numbers_are_ordered_by_value() {
    assert!(natural_cmp("n2", "n10").is_lt());
    assert!(natural_cmp("pod-10", "pod-9").is_gt());
    assert!(natural_cmp("a", "b").is_lt());
    assert!(
        natural_cmp("n01", "n1").is_ne(),
        "distinct names never compare equal"
    );
    assert!(natural_cmp("n1", "n1a").is_lt());
    let t0 = Instant::now();
    let mut job = Job::new(params(3), t0);
    job.handle(worker("x", "node10", 0), t0);
    job.handle(worker("y", "node9", 0), t0);
    let list = assignments(&job.handle(worker("z", "node1", 0), t0));
    let order: Vec<&str> = list.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(order, vec!["z", "y", "x"]);
}

#[test]
fn live_ranks_leave_out_the_finished_the_failed_and_the_silent() {
    let t0 = Instant::now();
    let mut job = running(4, t0);
    job.handle(
        Event::Finished {
            rank: 0,
            generation: 1,
            retriable: false,
            ok: true,
            error: String::new(),
            damaged_file: None,
        },
        t0,
    );
    job.handle(
        Event::Finished {
            rank: 1,
            generation: 1,
            retriable: false,
            ok: false,
            error: "boom".into(),
            damaged_file: None,
        },
        t0,
    );
    let later = t0 + Duration::from_secs(8);
    job.handle(
        Event::Heartbeat {
            rank: 2,
            generation: 1,
            phase: WorkerPhase::Training,
            telemetry: Default::default(),
        },
        later,
    );
    // Rank 3 was last heard at t0: past the 10 s timeout it is lost, not someone to tell.
    let mut live = job.live_ranks(t0 + Duration::from_secs(12));
    live.sort();
    assert_eq!(live, vec![2]);
}

#[test]
fn a_group_that_cannot_use_the_configured_device_is_refused_with_every_worker_told() {
    use crate::config::{CollectiveSetting, DeviceConfig, DeviceSetting};
    let t0 = Instant::now();
    let mut p = params(2);
    p.devices = DeviceConfig {
        device: DeviceSetting::Cuda,
        collective: CollectiveSetting::Auto,
        gpus_per_node: None,
    };
    let mut job = Job::new(p, t0);
    assert!(job.handle(worker("a", "h", 0), t0).is_empty());
    let actions = job.handle(worker("b", "h", 1), t0);
    let rejected: Vec<&str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Reject { worker_id, reason } => {
                assert!(reason.contains("cluster.device is cuda"), "{reason}");
                Some(worker_id.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(rejected, ["a", "b"]);
    assert!(matches!(
        actions.last(),
        Some(Action::Done(Outcome::Refused { reason })) if reason.contains("2 of 2 workers cannot use CUDA")
    ));
    // No generation starts: a heartbeat of rank 0 is told to stop.
    assert!(matches!(job.heartbeat_answer(1), HeartbeatAnswer::Stop(_)));
}

#[test]
fn a_cpu_group_is_assigned_the_cpu_and_the_ring() {
    let t0 = Instant::now();
    let mut job = Job::new(params(1), t0);
    let list = assignments(&job.handle(worker("a", "h", 0), t0));
    let a = &list[0].1;
    assert_eq!(
        (a.device, a.backend, a.nccl_id.clone()),
        (devices::DeviceKind::Cpu, devices::Backend::Ring, None)
    );
}

fn part(rank: u32, step: u64, is_final: bool, parts: u32) -> Event {
    Event::CheckpointReady {
        rank,
        generation: 1,
        step,
        staging_dir: format!("/c/.staging-{step}-r{rank}"),
        is_final,
        files: vec![ferrotune_data::manifest::FileDigest {
            path: format!("training_state/optimizer-rank-{rank:05}-of-{parts:05}.safetensors"),
            bytes: 8,
            sha256: "cd".into(),
        }],
        parts,
        timing: (0.0, 0.0),
    }
}

#[test]
fn a_checkpoint_in_parts_commits_once_every_rank_staged_its_part() {
    let t0 = Instant::now();
    let mut job = running(3, t0);
    // Periodic: every part is answered at once (the ranks go on training), the last one
    // brings the commit, rank 0's directory first and the others' parts in rank order.
    assert_eq!(
        job.handle(part(2, 4, false, 3), t0),
        vec![Action::AcceptPart]
    );
    assert_eq!(
        job.handle(part(0, 4, false, 3), t0),
        vec![Action::AcceptPart]
    );
    match &job.handle(part(1, 4, false, 3), t0)[..] {
        [Action::AcceptPart, Action::Commit {
            step: 4,
            staging_dir,
            parts,
            ..
        }] => {
            assert_eq!(staging_dir, "/c/.staging-4-r0");
            let dirs: Vec<&str> = parts.iter().map(|(d, _)| d.as_str()).collect();
            assert_eq!(dirs, ["/c/.staging-4-r1", "/c/.staging-4-r2"]);
        }
        other => panic!("{other:?}"),
    }
    // A part count that is not the group's is refused.
    assert!(matches!(
        &job.handle(part(1, 8, false, 2), t0)[..],
        [Action::Refuse(why), Action::Discard { .. }] if why.contains("the group has 3 workers")
    ));
    // The final checkpoint's calls are held until it commits.
    assert_eq!(
        job.handle(part(1, 9, true, 3), t0),
        vec![Action::HoldPart { step: 9 }]
    );
    // The job ends before every part is in: the staged part is discarded.
    let actions = job.handle(Event::Interrupted, t0);
    assert!(
        actions.iter().any(
            |a| matches!(a, Action::Discard { staging_dir } if staging_dir == "/c/.staging-9-r1")
        ),
        "{actions:?}"
    );
}
