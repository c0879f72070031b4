use super::*;
use ferrotune_data::pack::Overlong;
use ferrotune_data::record::Format;

/// A valid config whose paths exist under `dir`.
pub(crate) fn fixture(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("base")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::write(dir.join("base").join(f), "{}").unwrap();
    }
    std::fs::write(dir.join("train.jsonl"), "{\"text\": \"a\"}\n").unwrap();
    "job:
  name: t
  seed: 3
cluster:
  launcher: local
  world_size: 2
model:
  path: base
data:
  train: train.jsonl
  seq_len: 16
training:
  steps: 5
  micro_batch_size: 2
  lr: 1.0e-3
checkpoint:
  dir: out
"
    .to_string()
}

fn issues_for(text: &str, dir: &Path) -> Vec<Issue> {
    parse(text, dir).expect_err("config should be refused")
}

#[test]
fn valid_config_resolves_paths_against_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let c = parse(&fixture(tmp.path()), tmp.path()).unwrap();
    assert_eq!(c.cluster.world_size, 2);
    assert_eq!(c.model_path, tmp.path().join("base"));
    assert_eq!(c.checkpoint_dir, tmp.path().join("out"));
    assert_eq!(c.grad_accum_steps, 1);
    assert!(
        (c.min_lr - 1.0e-4).abs() < 1e-15,
        "min_lr defaults to lr / 10"
    );
    assert_eq!(c.cluster.bucket_bytes, 25 * 1024 * 1024);
}

#[test]
fn unknown_field_names_location_and_closest_valid_name() {
    let tmp = tempfile::tempdir().unwrap();
    let text = fixture(tmp.path()).replace("  micro_batch_size: 2", "  micro_batch_sise: 2");
    let issues = issues_for(&text, tmp.path());
    assert_eq!(issues.len(), 1);
    let i = &issues[0];
    assert_eq!((i.line, i.column), (14, 3));
    assert_eq!(i.field, "training.micro_batch_sise");
    assert!(
        i.message.contains("unknown field `micro_batch_sise`"),
        "{}",
        i.message
    );
    assert!(
        i.hint
            .as_deref()
            .unwrap()
            .contains("did you mean `micro_batch_size`?"),
        "{:?}",
        i.hint
    );
}

#[test]
fn wrong_type_names_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let text = fixture(tmp.path()).replace("  world_size: 2", "  world_size: two");
    let i = &issues_for(&text, tmp.path())[0];
    assert_eq!(i.field, "cluster.world_size");
    assert_eq!(i.line, 6);
    assert!(i.hint.is_some());
}

#[test]
fn missing_field_names_the_missing_key() {
    let tmp = tempfile::tempdir().unwrap();
    let text = fixture(tmp.path()).replace("  steps: 5\n", "");
    let i = &issues_for(&text, tmp.path())[0];
    assert_eq!(i.field, "training.steps");
    assert!(i.message.contains("missing field `steps`"), "{}", i.message);
}

#[test]
fn semantic_errors_are_all_reported_with_locations() {
    let tmp = tempfile::tempdir().unwrap();
    let text = fixture(tmp.path())
        .replace("  world_size: 2", "  world_size: 0")
        .replace("  path: base", "  path: nowhere");
    let issues = issues_for(&text, tmp.path());
    let ws = issues
        .iter()
        .find(|i| i.field == "cluster.world_size")
        .expect("world_size issue");
    assert_eq!((ws.line, ws.column), (6, 15));
    assert!(ws.message.contains("at least 1"));
    let model = issues
        .iter()
        .find(|i| i.field == "model.path")
        .expect("model.path issue");
    assert_eq!(model.line, 8);
    assert!(
        model.message.contains("does not exist"),
        "{}",
        model.message
    );
}

#[test]
fn pretrained_init_requires_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let text = fixture(tmp.path());
    std::fs::remove_file(tmp.path().join("base/model.safetensors")).unwrap();
    let issues = issues_for(&text, tmp.path());
    assert!(
        issues[0].message.contains("has no model.safetensors"),
        "{:?}",
        issues
    );
    let random = text.replace("  path: base\n", "  path: base\n  init: random\n");
    assert!(parse(&random, tmp.path()).is_ok());
    // A sharded checkpoint is weights too.
    std::fs::write(tmp.path().join("base/model.safetensors.index.json"), "{}").unwrap();
    assert!(parse(&text, tmp.path()).is_ok());
}

#[test]
fn checkpoint_dtype_and_shard_size() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(tmp.path());
    let with = |extra: &str| base.replace("  dir: out\n", &format!("  dir: out\n{extra}"));
    let ok = parse(&with("  dtype: bf16\n  max_shard_size: 2GiB\n"), tmp.path()).unwrap();
    assert_eq!(ok.checkpoint_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(ok.checkpoint_max_shard_bytes, 2 * 1024 * 1024 * 1024);
    let default = parse(&base, tmp.path()).unwrap();
    assert_eq!(default.checkpoint_dtype, None);
    assert_eq!(default.checkpoint_max_shard_bytes, 5_000_000_000);
    for (extra, field, needle) in [
        ("  dtype: int8\n", "checkpoint.dtype", "int8"),
        (
            "  max_shard_size: 5 parsecs\n",
            "checkpoint.max_shard_size",
            "5 parsecs",
        ),
    ] {
        let issues = issues_for(&with(extra), tmp.path());
        let issue = issues.iter().find(|i| i.field == field).expect(field);
        assert_eq!(issue.line, 18, "{issue:?}");
        assert!(issue.message.contains(needle), "{issue:?}");
    }
}

#[test]
fn rendered_error_names_file_line_column_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cluster.yaml");
    std::fs::write(
        &path,
        fixture(tmp.path()).replace("  world_size: 2", "  world_size: 0"),
    )
    .unwrap();
    let rendered = load(&path, Purpose::Launch).unwrap_err().to_string();
    assert!(
        rendered.starts_with(&format!("{}:6:15: `cluster.world_size`", path.display())),
        "{rendered}"
    );
    assert!(rendered.contains("help:"));
}

#[test]
fn key_paths_follow_indentation() {
    let text = "a:\n  b:\n    c: 1\n  d: 2\ne: 3\n";
    assert_eq!(issues::key_path_at(text, 3), vec!["a", "b", "c"]);
    assert_eq!(issues::key_path_at(text, 4), vec!["a", "d"]);
    assert_eq!(issues::key_path_at(text, 5), vec!["e"]);
}

#[test]
fn datasets_resolve_with_weights_sniffed_formats_and_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(tmp.path());
    std::fs::write(
        tmp.path().join("chat.jsonl"),
        "\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("t.jinja"), "{{ messages }}").unwrap();
    let text = base.replace(
        "  train: train.jsonl\n",
        "  packing: true\n  overlong: drop\n  chat_template_file: t.jinja\n  datasets:\n    - path: train.jsonl\n    - name: chat\n      path: chat.jsonl\n      weight: 3\n      eval: chat.jsonl\n",
    );
    let c = parse(&text, tmp.path()).unwrap();
    let d = &c.data;
    assert_eq!(d.datasets.len(), 2);
    assert_eq!(
        (
            d.datasets[0].name.as_str(),
            d.datasets[0].format,
            d.datasets[0].weight
        ),
        ("train", Format::Text, 1.0)
    );
    assert_eq!(
        (
            d.datasets[1].name.as_str(),
            d.datasets[1].format,
            d.datasets[1].weight
        ),
        ("chat", Format::Messages, 3.0)
    );
    assert_eq!(d.datasets[1].eval_path, Some(tmp.path().join("chat.jsonl")));
    assert!(d.packing && d.overlong == Overlong::Drop);
    assert_eq!(d.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(d.cache_dir, tmp.path().join("out/data-cache"));
}

#[test]
fn data_section_mistakes_are_located() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(tmp.path());
    let with = |data: &str| base.replace("  train: train.jsonl\n", data);
    let cases = [
        (
            with("  train: train.jsonl\n  format: csv\n"),
            "data.format",
            "unknown format `csv`",
        ),
        (
            with("  train: train.jsonl\n  overlong: wrap\n"),
            "data.overlong",
            "unknown policy `wrap`",
        ),
        (
            with("  datasets:\n    - path: train.jsonl\n      weight: 0\n"),
            "data.datasets[0].weight",
            "greater than 0",
        ),
        (
            with("  datasets:\n    - path: train.jsonl\n    - path: train.jsonl\n"),
            "data.datasets[1].name",
            "a second dataset is named `train`",
        ),
        (
            with("  train: train.jsonl\n  datasets:\n    - path: train.jsonl\n"),
            "data.train",
            "cannot be combined",
        ),
        (with(""), "data.datasets", "no training data"),
        (
            with("  train: train.jsonl\n  chat_template: \"{% for %}\"\n"),
            "data.chat_template",
            "does not parse",
        ),
    ];
    for (text, field, message) in cases {
        let issues = issues_for(&text, tmp.path());
        assert!(
            issues
                .iter()
                .any(|i| i.field == field && i.message.contains(message) && i.line > 0),
            "want {field}: {message}, got {issues:#?}"
        );
    }
    // A file whose first line matches no layout needs `format:`.
    std::fs::write(tmp.path().join("odd.jsonl"), "{\"body\": 1}\n").unwrap();
    let issues = issues_for(&with("  train: odd.jsonl\n"), tmp.path());
    assert!(
        issues[0].message.contains("cannot tell the layout"),
        "{issues:#?}"
    );
}

#[test]
fn precision_is_fp32_by_default_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(tmp.path());
    assert_eq!(parse(&base, tmp.path()).unwrap().precision, "fp32");
    let bf16 = base.replace("  path: base\n", "  path: base\n  precision: bfloat16\n");
    assert_eq!(parse(&bf16, tmp.path()).unwrap().precision, "bf16");
    let bad = base.replace("  path: base\n", "  path: base\n  precision: fp8\n");
    let issues = issues_for(&bad, tmp.path());
    assert_eq!(issues[0].field, "model.precision");
    assert!(issues[0].message.contains("unknown precision `fp8`"));
}

#[test]
fn zero_stage_is_0_by_default_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(tmp.path());
    assert_eq!(parse(&base, tmp.path()).unwrap().zero_stage, 0);
    let two = base.replace("  steps: 5\n", "  steps: 5\n  zero_stage: 2\n");
    assert_eq!(parse(&two, tmp.path()).unwrap().zero_stage, 2);
    let bad = base.replace("  steps: 5\n", "  steps: 5\n  zero_stage: 3\n");
    let issues = issues_for(&bad, tmp.path());
    assert_eq!(issues[0].field, "training.zero_stage");
    assert!(issues[0].message.contains("must be 0, 1 or 2, got 3"));
}

#[test]
fn chat_template_kwargs_are_a_mapping_without_the_renderers_names() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(tmp.path());
    let with = |line: &str| base.replace("  seq_len:", &format!("  {line}\n  seq_len:"));
    let ok = parse(
        &with("chat_template_kwargs: {enable_thinking: false}"),
        tmp.path(),
    )
    .unwrap();
    assert_eq!(
        ok.data.chat_template_kwargs.get("enable_thinking"),
        Some(&serde_json::Value::Bool(false))
    );
    assert!(parse(&base, tmp.path())
        .unwrap()
        .data
        .chat_template_kwargs
        .is_empty());
    for (line, want) in [
        ("chat_template_kwargs: [1]", "expected a mapping"),
        (
            "chat_template_kwargs: {messages: []}",
            "`messages` is set by the renderer",
        ),
    ] {
        let issues = issues_for(&with(line), tmp.path());
        assert_eq!(issues[0].field, "data.chat_template_kwargs", "{line}");
        assert!(
            issues[0].message.contains(want),
            "{line}: {}",
            issues[0].message
        );
    }
}

fn with_cluster(dir: &Path, cluster_lines: &str) -> String {
    fixture(dir).replace(
        "cluster:\n  launcher: local\n  world_size: 2\n",
        &format!("cluster:\n{cluster_lines}"),
    )
}

#[test]
fn listen_defaults_per_launcher_and_external_requires_it() {
    let tmp = tempfile::tempdir().unwrap();
    let c = parse(&fixture(tmp.path()), tmp.path()).unwrap();
    assert_eq!(c.cluster.listen.to_string(), "127.0.0.1:0");
    let slurm = with_cluster(tmp.path(), "  launcher: slurm\n  world_size: 2\n");
    let c = parse(&slurm, tmp.path()).unwrap();
    assert_eq!(c.cluster.listen.to_string(), "0.0.0.0:0");

    let external = with_cluster(tmp.path(), "  launcher: external\n  world_size: 2\n");
    let issues = issues_for(&external, tmp.path());
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].field, "cluster.listen");
    assert_eq!(issues[0].line, 6, "points into the cluster section");
    assert!(issues[0]
        .hint
        .as_deref()
        .unwrap()
        .contains("listen: 0.0.0.0:50051"));

    let bad = with_cluster(
        tmp.path(),
        "  launcher: external\n  world_size: 2\n  listen: coordinator:50051\n",
    );
    let i = &issues_for(&bad, tmp.path())[0];
    assert_eq!(
        (i.field.as_str(), i.line, i.column),
        ("cluster.listen", 7, 11)
    );
    assert!(
        i.message.contains("not an IP address with a port"),
        "{}",
        i.message
    );
}

#[test]
fn world_size_auto_reads_slurm_then_ferrotune_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let text = with_cluster(tmp.path(), "  launcher: slurm\n  world_size: auto\n");
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let both = env(&[("SLURM_NTASKS", "6"), ("FERROTUNE_WORLD_SIZE", "3")]);
    let c = parse_with_env(&text, tmp.path(), &both).unwrap();
    assert_eq!(c.cluster.world_size, 6);
    let ours = env(&[("FERROTUNE_WORLD_SIZE", "3")]);
    assert_eq!(
        parse_with_env(&text, tmp.path(), &ours)
            .unwrap()
            .cluster
            .world_size,
        3
    );

    // A number that disagrees with FERROTUNE_WORLD_SIZE (a Kubernetes worker Job's
    // parallelism) would wait for workers nobody starts: refused, naming both.
    let fixed = with_cluster(
        tmp.path(),
        "  launcher: external\n  listen: 127.0.0.1:50051\n  world_size: 4\n",
    );
    let e = parse_with_env(&fixed, tmp.path(), &ours).unwrap_err();
    assert_eq!(e[0].field, "cluster.world_size");
    assert!(
        e[0].message.contains("is 4 but FERROTUNE_WORLD_SIZE is 3"),
        "{}",
        e[0].message
    );
    let agrees = env(&[("FERROTUNE_WORLD_SIZE", "4")]);
    assert_eq!(
        parse_with_env(&fixed, tmp.path(), &agrees)
            .unwrap()
            .cluster
            .world_size,
        4
    );

    // `validate` on a login node leaves it to `launch`.
    let deferred = parse_for(&text, tmp.path(), &env(&[]), Purpose::Validate).unwrap();
    assert!(deferred.cluster.world_size_deferred);
    let resolved = parse_for(&text, tmp.path(), &ours, Purpose::Validate).unwrap();
    assert_eq!(
        (
            resolved.cluster.world_size,
            resolved.cluster.world_size_deferred
        ),
        (3, false)
    );
    let none = parse_with_env(&text, tmp.path(), &env(&[])).unwrap_err();
    assert_eq!(
        (none[0].field.as_str(), none[0].line),
        ("cluster.world_size", 6)
    );
    assert!(
        none[0].message.contains("neither SLURM_NTASKS"),
        "{}",
        none[0].message
    );
    let junk = parse_with_env(&text, tmp.path(), &env(&[("SLURM_NTASKS", "x")])).unwrap_err();
    assert!(
        junk[0].message.contains("SLURM_NTASKS=\"x\""),
        "{}",
        junk[0].message
    );

    let word = with_cluster(tmp.path(), "  launcher: local\n  world_size: many\n");
    let i = &issues_for(&word, tmp.path())[0];
    assert!(i.message.contains("got `many`"), "{}", i.message);
}

#[test]
fn token_file_is_read_relative_to_the_config_and_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("job.token"), "\n  abc123  \n").unwrap();
    let text = with_cluster(
        tmp.path(),
        "  launcher: external\n  world_size: 2\n  listen: 0.0.0.0:50051\n  token_file: job.token\n",
    );
    let c = parse(&text, tmp.path()).unwrap();
    assert_eq!(c.cluster.token_from_file.as_deref(), Some("abc123"));
    assert_eq!(c.cluster.launcher, LauncherKind::External);

    let missing = text.replace("job.token", "nope.token");
    let i = &issues_for(&missing, tmp.path())[0];
    assert_eq!((i.field.as_str(), i.line), ("cluster.token_file", 8));
    assert!(i.message.contains("nope.token"), "{}", i.message);
    std::fs::write(tmp.path().join("job.token"), "  \n").unwrap();
    let i = &issues_for(&text, tmp.path())[0];
    assert!(i.message.contains("holds no usable token"), "{}", i.message);
}

#[test]
fn elastic_settings_have_defaults_and_min_workers_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let c = parse(&fixture(tmp.path()), tmp.path()).unwrap();
    assert_eq!(c.cluster.max_restarts, 3);
    assert_eq!(c.cluster.rejoin_timeout, Duration::from_secs(120));
    assert_eq!(c.cluster.step_timeout, Duration::from_secs(600));
    assert_eq!(
        c.cluster.min_workers, 2,
        "all workers unless told otherwise"
    );
    assert_eq!(c.cluster.resume, ResumeSetting::Never);

    let set = with_cluster(
        tmp.path(),
        "  launcher: local\n  world_size: 4\n  max_restarts: 0\n  min_workers: 2\n  rejoin_timeout_s: 30\n  step_timeout_s: 90\n  resume: auto\n",
    );
    let c = parse(&set, tmp.path()).unwrap();
    assert_eq!(c.cluster.max_restarts, 0);
    assert_eq!(c.cluster.min_workers, 2);
    assert_eq!(c.cluster.rejoin_timeout, Duration::from_secs(30));
    assert_eq!(c.cluster.step_timeout, Duration::from_secs(90));
    assert_eq!(c.cluster.resume, ResumeSetting::Auto);

    let too_many = with_cluster(
        tmp.path(),
        "  launcher: local\n  world_size: 2\n  min_workers: 3\n",
    );
    let i = &issues_for(&too_many, tmp.path())[0];
    assert_eq!((i.field.as_str(), i.line), ("cluster.min_workers", 7));
    assert!(
        i.message
            .contains("between 1 and cluster.world_size (2), got 3"),
        "{}",
        i.message
    );

    let bad_resume = with_cluster(
        tmp.path(),
        "  launcher: local\n  world_size: 2\n  resume: always\n",
    );
    let i = &issues_for(&bad_resume, tmp.path())[0];
    assert_eq!(i.line, 7, "{i:?}");
}

#[test]
fn devices_default_to_auto_and_gpus_per_node_sizes_a_local_job() {
    use super::{CollectiveSetting, DeviceSetting};
    let tmp = tempfile::tempdir().unwrap();
    let c = parse(&fixture(tmp.path()), tmp.path()).unwrap();
    assert_eq!(
        (c.cluster.devices.device, c.cluster.devices.collective),
        (DeviceSetting::Auto, CollectiveSetting::Auto)
    );
    assert!(!c.cluster.devices.binds_gpus());

    // One local worker per GPU, without any variable.
    let text = with_cluster(
        tmp.path(),
        "  launcher: local\n  world_size: auto\n  gpus_per_node: 4\n",
    );
    let c = parse_with_env(&text, tmp.path(), &|_: &str| None).unwrap();
    assert_eq!(c.cluster.world_size, 4);
    assert!(!c.cluster.world_size_deferred);
    assert!(c.cluster.devices.binds_gpus());

    // On Slurm gpus_per_node binds GPUs but the allocation sizes the job.
    let slurm = with_cluster(
        tmp.path(),
        "  launcher: slurm\n  world_size: 16\n  gpus_per_node: 8\n  collective: nccl\n",
    );
    let c = parse(&slurm, tmp.path()).unwrap();
    assert_eq!(c.cluster.world_size, 16);
    assert_eq!(c.cluster.devices.collective, CollectiveSetting::Nccl);

    let zero = with_cluster(
        tmp.path(),
        "  launcher: slurm\n  world_size: 2\n  gpus_per_node: 0\n",
    );
    assert_eq!(
        issues_for(&zero, tmp.path())[0].field,
        "cluster.gpus_per_node"
    );
    let cpu_gpus = with_cluster(
        tmp.path(),
        "  launcher: slurm\n  world_size: 2\n  device: cpu\n  gpus_per_node: 8\n",
    );
    let i = &issues_for(&cpu_gpus, tmp.path())[0];
    assert_eq!((i.field.as_str(), i.line), ("cluster.gpus_per_node", 8));
}
