//! A user's mistake in cluster.yaml: a located message, a non-zero exit, no panic, nothing left.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn each_invalid_config_gets_a_located_message() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(tiny_example(tmp.path())).unwrap();
    let line_of = |needle: &str| {
        good.lines()
            .position(|l| l.trim_start().starts_with(needle))
            .unwrap()
            + 1
    };
    // A missing field is located at its section (serde-saphyr points inside the mapping).
    let data_section = line_of("data:")..line_of("training:");
    let cases = [
        (
            "unknown field",
            good.replace("  micro_batch_size: 8", "  micro_batchsize: 8"),
            "training.micro_batchsize",
            line_of("micro_batch_size"),
            "did you mean `micro_batch_size`",
        ),
        (
            "wrong type",
            good.replace("  steps: 60", "  steps: sixty"),
            "training.steps",
            line_of("steps:"),
            "steps",
        ),
        (
            "missing field",
            good.replace("  seq_len: 160", ""),
            "data.seq_len",
            0,
            "missing field `seq_len`",
        ),
        (
            "world_size 0",
            good.replace("  world_size: 2", "  world_size: 0"),
            "cluster.world_size",
            line_of("world_size"),
            "must be at least 1",
        ),
        (
            "an unknown device",
            good.replace("  world_size: 2", "  world_size: 2\n  device: tpu"),
            "cluster.device",
            line_of("world_size") + 1,
            "tpu",
        ),
        (
            "nccl on the cpu",
            good.replace(
                "  world_size: 2",
                "  world_size: 2\n  device: cpu\n  collective: nccl",
            ),
            "cluster.collective",
            line_of("world_size") + 2,
            "use `collective: ring` on the CPU",
        ),
        (
            "more local workers than GPUs",
            good.replace("  world_size: 2", "  world_size: 2\n  gpus_per_node: 1"),
            "cluster.world_size",
            line_of("world_size"),
            "at most gpus_per_node",
        ),
        (
            "missing model path",
            good.replace("  path: base ", "  path: no-such-model "),
            "model.path",
            line_of("path: base"),
            "does not exist",
        ),
    ];
    for (what, text, field, line, detail) in cases {
        assert_ne!(text, good, "{what}: the fixture edit did not apply");
        let path = tmp.path().join("cluster.yaml");
        std::fs::write(&path, &text).unwrap();
        let mut run = Launch::start(&path);
        let err = run.refused(what, Duration::from_secs(20), Duration::from_secs(2));
        let prefix = format!("{}:", path.display());
        let reported: usize = err
            .split(&prefix)
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no {prefix}LINE:COLUMN in:\n{err}"));
        if line == 0 {
            assert!(
                data_section.contains(&reported),
                "{what}: line {reported} is outside the data section"
            );
        } else {
            assert_eq!(reported, line, "{what}: wrong line in:\n{err}");
        }
        assert!(
            err.contains(&format!("`{field}`")),
            "{what}: expected field {field} in:\n{err}"
        );
        assert!(
            err.contains(detail),
            "{what}: expected {detail:?} in:\n{err}"
        );
        assert!(
            !tmp.path().join("runs").exists(),
            "{what}: nothing may be written before validation passes"
        );
    }
}

/// Refusals that depend on where `launch` runs rather than on the file alone: each exits 2 with
/// the reason and a hint, before any dataset is read or any worker started.
#[test]
fn launch_refuses_what_it_cannot_start() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(tiny_example(tmp.path())).unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    let cluster = |lines: &str| {
        good.replace(
            "  launcher: local\n  world_size: 2\n",
            &format!("{lines}  world_size: 2\n"),
        )
    };
    let cases = [
        (
            "slurm outside an allocation",
            cluster("  launcher: slurm\n"),
            "launcher: slurm runs inside a Slurm allocation, and SLURM_JOB_ID is not set",
            "sbatch deploy/slurm/ferrotune.sbatch",
        ),
        (
            "a listen address in use",
            cluster(&format!("  launcher: local\n  listen: {busy}\n")),
            &*format!("cannot listen for workers on {busy} (cluster.listen)"),
            "pick a free one",
        ),
        (
            "a listen address of another host",
            cluster("  launcher: local\n  listen: 192.0.2.1:0\n"),
            "cannot listen for workers on 192.0.2.1:0 (cluster.listen)",
            "not one of this host's",
        ),
        (
            "external without a token",
            cluster("  launcher: external\n  listen: 127.0.0.1:0\n"),
            "launcher: external needs a job token",
            "cluster.token_file",
        ),
        (
            "external without listen",
            cluster("  launcher: external\n"),
            "`cluster.listen`",
            "listen: 0.0.0.0:50051",
        ),
    ];
    for (what, text, message, hint) in cases {
        let path = tmp.path().join("launch.yaml");
        std::fs::write(&path, &text).unwrap();
        let mut cmd = std::process::Command::new(bin("coordinator"));
        cmd.arg("launch")
            .arg(&path)
            .env_remove("SLURM_JOB_ID")
            .env_remove("FERROTUNE_JOB_TOKEN");
        let mut run = Launch::spawn(cmd);
        let err = run.refused(what, Duration::from_secs(20), Duration::from_secs(2));
        assert!(
            err.contains(message),
            "{what}: expected {message:?} in:\n{err}"
        );
        assert!(
            err.contains(hint),
            "{what}: expected hint {hint:?} in:\n{err}"
        );
        assert!(
            !tmp.path().join("runs").exists(),
            "{what}: nothing may be written before the launch is possible"
        );
    }
}
