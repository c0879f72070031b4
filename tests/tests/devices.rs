//! `cluster.device` and `cluster.collective` on a host without a GPU: a job that asks for CUDA
//! or NCCL is refused once its workers have said what they lack — exit 2, one message naming
//! what is missing and how to get it, no panic, no process left. (`auto` training on the CPU is
//! every other end-to-end test; settings that contradict each other are in bad_config.rs.)

mod common;
use common::*;
use std::time::Duration;

#[test]
fn cuda_or_nccl_on_a_host_without_them_exits_2_with_the_workers_reason() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(tiny_example(tmp.path())).unwrap();
    let with =
        |lines: &str| good.replace("  world_size: 2\n", &format!("  world_size: 2\n{lines}"));
    let cases = [
        (
            "device: cuda",
            with("  device: cuda\n"),
            "cluster.device is cuda",
        ),
        (
            "collective: nccl",
            with("  collective: nccl\n"),
            "cluster.collective is nccl",
        ),
        (
            "gpus_per_node on the local launcher",
            with("  gpus_per_node: 2\n  device: cuda\n"),
            "cluster.device is cuda",
        ),
    ];
    for (what, text, message) in cases {
        assert_ne!(text, good, "{what}: the fixture edit did not apply");
        let path = tmp.path().join("devices.yaml");
        std::fs::write(&path, &text).unwrap();
        let mut run = Launch::start(&path);
        let err = run.refused(what, Duration::from_secs(120), Duration::from_secs(5));
        assert!(
            err.contains(message),
            "{what}: expected {message:?} in:\n{err}"
        );
        // The worker's own diagnosis: this CPU build and (here) no driver, with what to do.
        assert!(
            err.contains("2 of 2 workers cannot use CUDA") && err.contains("make build-cuda"),
            "{what}: the workers' reason is missing from:\n{err}"
        );
        let checkpoints = tmp.path().join("runs/checkpoints");
        let written: Vec<_> = std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("step-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            written.is_empty(),
            "{what}: checkpoints written: {written:?}"
        );
    }
}
