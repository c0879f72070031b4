//! Generations: which failures re-form the group, what survivors are told, what the next
//! generation starts from, and when restarts run out.

use super::*;

fn params(world_size: u32, max_restarts: u32) -> JobParams {
    JobParams {
        world_size,
        heartbeat_timeout: Duration::from_secs(10),
        rendezvous_timeout: Duration::from_secs(60),
        rejoin_timeout: Duration::from_secs(30),
        step_timeout: Duration::from_secs(600),
        failure_grace: Duration::from_secs(1),
        version: "1.2.3".into(),
        tracks_exits: true,
        max_restarts,
        restarts_done: 0,
        resume_from: None,
        earlier_checkpoints: Vec::new(),
        grad_accum_steps: 2,
        min_workers: world_size,
        devices: crate::config::DeviceConfig::default(),
        gpu_need: None,
    }
}

fn register(id: &str, index: u32) -> Event {
    Event::Registered(WorkerInfo {
        worker_id: id.into(),
        host: "h".into(),
        local_index: index,
        peer_address: format!("h:{}", 9000 + index),
        version: "1.2.3".into(),
        devices: Default::default(),
    })
}

fn start(p: JobParams, t0: Instant) -> Job {
    let mut job = Job::new(p.clone(), t0);
    for i in 0..p.world_size {
        job.handle(register(&format!("w{i}"), i), t0);
    }
    assert_eq!(job.heartbeat_answer(1), HeartbeatAnswer::Continue);
    job
}

fn killed(id: &str) -> Event {
    Event::WorkerExited {
        worker_id: id.into(),
        success: false,
        code: None,
        status: "was killed by signal 9 (SIGKILL)".into(),
        last_line: None,
    }
}

fn failed(rank: u32, generation: u64, retriable: bool) -> Event {
    Event::Finished {
        rank,
        generation,
        ok: false,
        error: "lost the connection to rank 1".into(),
        retriable,
        damaged_file: None,
    }
}

fn committed(step: u64) -> Event {
    Event::CheckpointCommitted {
        step,
        path: format!("/c/step-{step}"),
        is_final: false,
    }
}

fn ready(rank: u32, generation: u64, step: u64) -> Event {
    Event::CheckpointReady {
        rank,
        generation,
        step,
        staging_dir: format!("/c/.staging-{step}"),
        is_final: false,
        files: Vec::new(),
        parts: 1,
        timing: (0.0, 0.0),
    }
}

#[test]
fn a_killed_worker_is_replaced_and_the_group_continues_from_the_newest_checkpoint() {
    let t0 = Instant::now();
    let mut job = start(params(2, 3), t0);
    assert!(matches!(
        job.handle(ready(0, 1, 3), t0)[..],
        [Action::Commit { .. }]
    ));
    job.handle(committed(3), t0);
    // The survivor's broken ring waits for its cause; the victim's exit is it.
    assert!(
        job.handle(failed(0, 1, true), t0).is_empty(),
        "waits for the cause"
    );
    let later = t0 + Duration::from_millis(50);
    match &job.handle(killed("w1"), later)[..] {
        [Action::Restart {
            generation: 2,
            restart: 1,
            max: 3,
            reason,
            replace,
        }, Action::ChooseResumePoint {
            candidates,
            set_aside: None,
        }] => {
            assert!(
                reason.starts_with("rank 1 (worker w1 on host h) was killed"),
                "{reason}"
            );
            assert_eq!(replace, &vec!["w1".to_string()]);
            assert_eq!(candidates, &vec!["/c/step-3".to_string()]);
        }
        other => panic!("expected a restart, got {other:?}"),
    }
    assert_eq!(job.heartbeat_answer(1), HeartbeatAnswer::Rejoin);
    assert_eq!(job.heartbeat_answer(2), HeartbeatAnswer::Continue);
    assert!(job.handle(register("w0", 0), later).is_empty());
    assert!(
        job.handle(register("w1", 1), later).is_empty(),
        "waits for the resume point"
    );
    let a = job.handle(
        Event::ResumePointChosen {
            path: Some("/c/step-3".into()),
        },
        later,
    );
    match &a[..] {
        [Action::Assign(list)] => {
            assert_eq!(list.len(), 2);
            for (id, a) in list {
                assert_eq!(a.generation, 2);
                assert_eq!(a.resume_from.as_deref(), Some("/c/step-3"));
                assert_eq!(
                    a.rank,
                    if id == "w0" { 0 } else { 1 },
                    "same ranks as before"
                );
            }
        }
        other => panic!("expected the new generation, got {other:?}"),
    }
    assert_eq!(job.restarts(), 1);
}

#[test]
fn reports_of_an_ended_generation_are_ignored_and_its_checkpoints_refused() {
    let t0 = Instant::now();
    let mut job = start(params(2, 3), t0);
    job.handle(killed("w1"), t0);
    job.handle(Event::Tick, t0 + Duration::from_millis(1100));
    // Refused, and its staging removed: it will never be a checkpoint.
    match &job.handle(ready(0, 1, 6), t0)[..] {
        [Action::Refuse(_), Action::Discard { staging_dir }] => {
            assert_eq!(staging_dir, "/c/.staging-6")
        }
        other => panic!("{other:?}"),
    }
    let step = Event::StepReported {
        rank: 0,
        generation: 1,
        metrics: StepMetrics {
            step: 7,
            loss: 1.0,
            lr: 0.1,
            grad_norm: 1.0,
            tokens: 1,
            input_tokens: 1,
            step_seconds: 0.1,
        },
    };
    assert!(job.handle(step, t0).is_empty());
    assert!(
        job.handle(failed(0, 1, true), t0).is_empty(),
        "the old generation's report"
    );
}

#[test]
fn the_resume_point_is_chosen_only_after_a_commit_in_flight_has_landed() {
    let t0 = Instant::now();
    let mut job = start(params(2, 3), t0);
    job.handle(ready(0, 1, 3), t0);
    let a = job.handle(killed("w1"), t0);
    assert!(matches!(a[..], [Action::Restart { .. }]), "{a:?}");
    match &job.handle(committed(3), t0)[..] {
        [Action::ChooseResumePoint { candidates, .. }] => {
            assert_eq!(candidates, &vec!["/c/step-3".to_string()])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn restarts_run_out_for_the_whole_job_counting_earlier_coordinators() {
    let t0 = Instant::now();
    let mut p = params(2, 2);
    p.restarts_done = 1;
    let mut job = start(p, t0);
    let a = job.handle(killed("w1"), t0);
    assert!(
        matches!(a[..], [Action::Restart { restart: 2, .. }, ..]),
        "{a:?}"
    );
    job.handle(Event::ResumePointChosen { path: None }, t0);
    job.handle(register("w0", 0), t0);
    let a = job.handle(register("w1", 1), t0);
    assert!(
        matches!(&a[..], [Action::Assign(l)] if l[0].1.resume_from.is_none()),
        "{a:?}"
    );
    let t1 = t0 + Duration::from_secs(2);
    match &job.handle(killed("w0"), t1)[..] {
        [Action::StopWorkers { .. }, Action::Done(Outcome::Failed { reason })] => assert!(
            reason.contains("no restart left: 2 of cluster.max_restarts = 2 used"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_permanent_error_ends_the_job_without_a_restart() {
    let t0 = Instant::now();
    let mut job = start(params(2, 3), t0);
    job.handle(failed(1, 1, false), t0);
    let a = job.handle(Event::Tick, t0 + Duration::from_millis(1100));
    assert!(matches!(
        a[..],
        [
            Action::StopWorkers { .. },
            Action::Done(Outcome::Failed { .. })
        ]
    ));

    let mut job = start(params(2, 3), t0);
    let a = job.handle(
        Event::WorkerExited {
            worker_id: "w0".into(),
            success: false,
            code: Some(failure::PERMANENT_EXIT),
            status: "exited with code 2".into(),
            last_line: None,
        },
        t0,
    );
    assert!(matches!(
        a[..],
        [
            Action::StopWorkers { .. },
            Action::Done(Outcome::Failed { .. })
        ]
    ));
}

#[test]
fn a_damaged_checkpoint_is_set_aside_and_the_one_before_it_taken() {
    let t0 = Instant::now();
    let mut p = params(2, 3);
    p.resume_from = Some("/c/step-3".into());
    let mut job = start(p, t0);
    job.handle(committed(6), t0);
    job.handle(killed("w1"), t0);
    job.handle(Event::Tick, t0 + Duration::from_millis(1100));
    job.handle(
        Event::ResumePointChosen {
            path: Some("/c/step-6".into()),
        },
        t0,
    );
    job.handle(register("w0", 0), t0);
    job.handle(register("w1", 1), t0);
    let t1 = t0 + Duration::from_secs(2);
    let damaged = Event::Finished {
        rank: 0,
        generation: 2,
        ok: false,
        error: "model.safetensors does not match".into(),
        retriable: false,
        damaged_file: Some("model.safetensors".into()),
    };
    job.handle(damaged, t1);
    match &job.handle(Event::Tick, t1 + Duration::from_millis(1100))[..] {
        [Action::Restart { generation: 3, .. }, Action::ChooseResumePoint {
            candidates,
            set_aside: Some((dir, file)),
        }] => {
            assert_eq!(
                (dir.as_str(), file.as_str()),
                ("/c/step-6", "model.safetensors")
            );
            assert_eq!(candidates, &vec!["/c/step-3".to_string()]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_group_that_trains_without_a_step_report_is_restarted() {
    let t0 = Instant::now();
    let mut p = params(2, 3);
    p.step_timeout = Duration::from_secs(60);
    let mut job = start(p, t0);
    let beat = |rank, phase| Event::Heartbeat {
        rank,
        generation: 1,
        phase,
        telemetry: Default::default(),
    };
    // A long checkpoint write is not a hang.
    for s in (5..=60).step_by(5) {
        let t = t0 + Duration::from_secs(s);
        job.handle(beat(0, WorkerPhase::Checkpoint), t);
        job.handle(beat(1, WorkerPhase::Training), t);
        assert!(job.handle(Event::Tick, t).is_empty());
    }
    let mut restarted = None;
    for s in (65..=130).step_by(5) {
        let t = t0 + Duration::from_secs(s);
        job.handle(beat(0, WorkerPhase::Training), t);
        job.handle(beat(1, WorkerPhase::Training), t);
        let a = job.handle(Event::Tick, t + Duration::from_millis(1100));
        if let [Action::Restart { reason, .. }, ..] = &a[..] {
            restarted = Some((s, reason.clone()));
            break;
        }
    }
    let (at, reason) = restarted.expect("the watchdog restarts a hung group");
    assert!(
        (120..=130).contains(&at),
        "60 s of training without a step: {at}"
    );
    assert!(reason.contains("no step was reported"), "{reason}");
}

#[test]
fn a_new_process_under_a_running_identity_ends_the_generation_and_joins_the_next() {
    let t0 = Instant::now();
    let mut p = params(2, 3);
    p.tracks_exits = false;
    let mut job = start(p, t0);
    // A restarted pod registers before its predecessor's heartbeats are missed: its
    // registration is held (not refused) for the generation it starts.
    let a = job.handle(register("w1", 1), t0);
    match &a[..] {
        [Action::Restart {
            reason, replace, ..
        }, Action::ChooseResumePoint { .. }] => {
            assert!(reason.contains("registered again"), "{reason}");
            assert!(replace.is_empty(), "{replace:?}");
        }
        other => panic!("{other:?}"),
    }
    job.handle(Event::ResumePointChosen { path: None }, t0);
    let a = job.handle(register("w0", 0), t0);
    assert!(
        matches!(&a[..], [Action::Assign(l)] if l.len() == 2),
        "{a:?}"
    );
}

#[test]
fn workers_that_do_not_come_back_end_the_job_naming_them() {
    let t0 = Instant::now();
    let mut job = start(params(2, 3), t0);
    job.handle(killed("w1"), t0);
    job.handle(Event::ResumePointChosen { path: None }, t0);
    job.handle(register("w0", 0), t0);
    assert!(job
        .handle(Event::Tick, t0 + Duration::from_secs(29))
        .is_empty());
    match &job.handle(Event::Tick, t0 + Duration::from_secs(31))[..] {
        [_, Action::Done(Outcome::Failed { reason })] => {
            assert!(
                reason.contains("only 1 of 2 workers registered again"),
                "{reason}"
            );
            assert!(reason.ends_with("missing: w1"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_group_that_lost_workers_for_good_shrinks_keeping_the_global_batch() {
    let t0 = Instant::now();
    let mut p = params(3, 3);
    p.min_workers = 2;
    let mut job = start(p.clone(), t0);
    job.handle(killed("w2"), t0);
    job.handle(Event::ResumePointChosen { path: None }, t0);
    job.handle(register("w0", 0), t0);
    job.handle(register("w1", 1), t0);
    let a = job.handle(Event::Tick, t0 + Duration::from_secs(31));
    match &a[..] {
        [Action::Shrink {
            from: 3,
            to: 2,
            grad_accum_steps: (2, 3),
        }, Action::Assign(list)] => {
            assert_eq!(list.len(), 2);
            assert!(list
                .iter()
                .all(|(_, a)| a.world_size == 2 && a.grad_accum_steps == 3));
        }
        other => panic!("{other:?}"),
    }

    // 3 × 1 micro-batches per step do not divide among the 2 left: refused, saying why.
    let mut p = params(3, 3);
    p.min_workers = 1;
    p.grad_accum_steps = 1;
    let mut job = start(p, t0);
    job.handle(killed("w2"), t0);
    job.handle(Event::Tick, t0);
    job.handle(Event::ResumePointChosen { path: None }, t0);
    job.handle(register("w0", 0), t0);
    job.handle(register("w1", 1), t0);
    match &job.handle(Event::Tick, t0 + Duration::from_secs(31))[..] {
        [_, Action::Done(Outcome::Failed { reason })] => {
            assert!(reason.contains("does not divide among 2"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}
