//! Helpers for driving the real binaries as a user would.
#![allow(dead_code)]

pub mod netns;
pub mod pods;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Jobs use both cores; running two at once would only make their timings meaningless.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A binary of this workspace, built in the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`make test` does: cargo build --release --workspace)",
        path.display()
    );
    path
}

/// Python with the test requirements (safetensors, numpy): FERROTUNE_PYTHON, set by `make test`.
/// Outside CI a missing interpreter skips the Python half of a test; under CI=true it fails.
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("FERROTUNE_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("FERROTUNE_PYTHON is not set under CI=true: run the suite through `make test`")
        }
        None => {
            eprintln!(
                "skipping Python checks: FERROTUNE_PYTHON is not set (run through `make test`)"
            );
            None
        }
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// examples/tiny (config, base model, data) copied into `dir`, without earlier runs.
pub fn tiny_example(dir: &Path) -> PathBuf {
    let src = repo_root().join("examples/tiny");
    for part in ["base", "data"] {
        copy_dir(&src.join(part), &dir.join(part));
    }
    std::fs::copy(src.join("cluster.yaml"), dir.join("cluster.yaml")).unwrap();
    dir.join("cluster.yaml")
}

/// Rewrites a config in place, each `(from, to)` in turn; every `from` must be in it (a pattern
/// that no longer matches would silently test the unedited config).
pub fn edit_config(path: &Path, edits: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(path).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "`{from}` is not in {}", path.display());
        text = text.replace(from, to);
    }
    std::fs::write(path, text).unwrap();
}

/// A small random-init model using the example tokenizer, plus the example data, in `dir`.
pub fn small_random_model(dir: &Path) {
    let src = repo_root().join("examples/tiny");
    std::fs::create_dir_all(dir.join("base")).unwrap();
    std::fs::copy(
        src.join("base/tokenizer.json"),
        dir.join("base/tokenizer.json"),
    )
    .unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 256, "eos_token_id": 257
    });
    std::fs::write(dir.join("base/config.json"), config.to_string()).unwrap();
    copy_dir(&src.join("data"), &dir.join("data"));
}

/// A job on [`small_random_model`]'s model and data, checkpointing into `out`.
pub fn random_model_job(
    world_size: u32,
    micro_batch: u32,
    seed: u64,
    steps: u64,
    lr: f64,
    out: &str,
) -> String {
    format!(
        "job:
  name: random-model
  seed: {seed}
cluster:
  launcher: local
  world_size: {world_size}
  threads_per_worker: 1
model:
  path: base
  init: random
data:
  train: data/train.jsonl
  seq_len: 32
training:
  steps: {steps}
  micro_batch_size: {micro_batch}
  grad_accum_steps: 2
  lr: {lr:e}
  warmup_steps: 1
  weight_decay: 0.1
  grad_clip: 1.0
checkpoint:
  dir: {out}
"
    )
}

/// A free loopback port (another program may take it before it is used: harmless in tests, the
/// launch refuses a taken port loudly).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every process of this machine whose environment carries `FERROTUNE_TEST_TAG=tag`.
pub fn tagged_processes(tag: &str) -> Vec<(i32, String)> {
    let needle = format!("FERROTUNE_TEST_TAG={tag}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            // Zombies have an empty command line; they are already dead.
            if !cmd.trim().is_empty() {
                found.push((pid, cmd));
            }
        }
    }
    found
}

/// Waits (bounded) until no process with the tag is alive; returns those still there.
pub fn wait_no_tagged(tag: &str, within: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left = tagged_processes(tag);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Distinct per call: the test's pid and the wall clock in nanoseconds.
pub fn unique_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// A running `coordinator launch`, its output collected line by line. Killed on drop.
pub struct Launch {
    pub child: Child,
    pub tag: String,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Launch {
    pub fn start(config: &Path) -> Launch {
        Self::start_with(config, &[])
    }

    /// `coordinator launch CONFIG ARGS...`
    pub fn start_with(config: &Path, args: &[&str]) -> Launch {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.arg("launch").arg(config).args(args);
        Self::spawn(cmd)
    }

    /// Runs `cmd` (any process of the job: a coordinator, a worker, `ip netns exec ...`) tagged
    /// with a fresh FERROTUNE_TEST_TAG, its output collected.
    pub fn spawn(cmd: Command) -> Launch {
        Self::spawn_tagged(cmd, &unique_tag())
    }

    /// Like [`Launch::spawn`] with a given tag, so that several processes share one.
    pub fn spawn_tagged(mut cmd: Command, tag: &str) -> Launch {
        let mut child = cmd
            .env("FERROTUNE_TEST_TAG", tag)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Launch {
            child,
            tag: tag.to_string(),
            stdout,
            stderr,
        }
    }

    /// Waits until a line of stdout satisfies `found` and returns it; fails the test when the
    /// process exits first or `limit` passes.
    pub fn wait_for_line(&mut self, limit: Duration, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.stdout.lock().unwrap().iter().find(|l| found(l)) {
                return line.clone();
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "exited before the expected line; stdout:\n{}\nstderr:\n{}",
                self.stdout_text(),
                self.stderr_text()
            );
            assert!(
                Instant::now() < deadline,
                "no expected line within {limit:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout_text(),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for exit; kills the process and fails the test past `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "still running after {limit:?}; stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a refusal: exit code 2 within `limit`, no panic, and no process of this run
    /// alive `settle` later. Returns stderr for the caller's checks of the message.
    pub fn refused(&mut self, what: &str, limit: Duration, settle: Duration) -> String {
        let status = self.wait(limit);
        let err = self.stderr_text();
        assert_eq!(status.code(), Some(2), "{what}: exit code; stderr:\n{err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{what}:\n{err}"
        );
        assert!(
            wait_no_tagged(&self.tag, settle).is_empty(),
            "{what}: processes left behind"
        );
        err
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion and returns its stdout; a failure panics with its stderr.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python snippet with the test interpreter; returns its stdout.
pub fn run_python(python: &Path, code: &str, args: &[&str]) -> String {
    stdout_of(Command::new(python).arg("-c").arg(code).args(args))
}

/// loss.svg and loss.png in `dir` are valid: the SVG parses as XML (Python's parser, when the
/// test Python is there) and draws the curves, the PNG decodes to the plot's size.
pub fn assert_valid_plots(dir: &Path) {
    let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
    assert!(
        svg.contains("<polyline") || svg.contains("<path"),
        "no curve in loss.svg"
    );
    if let Some(python) = python() {
        let code = "import sys, xml.etree.ElementTree as ET; r = ET.parse(sys.argv[1]).getroot(); print(r.tag)";
        let svg_path = dir.join("loss.svg");
        let tag = run_python(&python, code, &[svg_path.to_str().unwrap()]);
        assert_eq!(tag.trim(), "{http://www.w3.org/2000/svg}svg");
    }
    let png = image::open(dir.join("loss.png")).expect("loss.png decodes");
    assert_eq!((png.width(), png.height()), (1000, 680));
}

/// The fp32 weights of the newest checkpoint under `root` (its `latest` pointer), by name.
pub fn latest_weights(root: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    let bytes = std::fs::read(root.join(latest.trim()).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect()
}

/// The largest |a - b| over all weights of two checkpoints of the same model.
pub fn max_abs_diff(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, va)| va.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// One step of a job's history at full precision (`coordinator status --json`).
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
}

/// The step history of the job whose checkpoints are under `root`.
pub fn step_history(root: &Path) -> Vec<StepRecord> {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.arg("status").arg(root).arg("--json");
    let status: serde_json::Value = serde_json::from_str(&stdout_of(&mut cmd)).unwrap();
    status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| StepRecord {
            step: p["step"].as_u64().unwrap(),
            loss: p["loss"].as_f64().unwrap(),
            grad_norm: p["grad_norm"].as_f64().unwrap(),
        })
        .collect()
}

/// The conversations of a `messages` JSON Lines file, parsed as the data pipeline parses them.
pub fn conversations(file: &Path) -> Vec<Vec<ferrotune_data::record::Message>> {
    use ferrotune_data::record::{parse, Format, Record};
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| match parse(l, Format::Messages).unwrap() {
            Record::Messages(m) => m,
            other => panic!("{other:?}"),
        })
        .collect()
}
