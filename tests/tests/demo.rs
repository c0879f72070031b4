//! The README's demo, as a new user runs it: launch the tiny example, see the loss fall, get a
//! checkpoint that Python's `safetensors` and `json` read.

mod common;
use common::*;
use std::time::Duration;

fn number_after(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn tiny_example_fine_tunes_and_writes_a_loadable_checkpoint() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_example(tmp.path());
    let mut run = Launch::start(&config);
    let status = run.wait(Duration::from_secs(180));
    let (out, err) = (run.stdout_text(), run.stderr_text());
    assert!(
        status.success(),
        "demo failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let step_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(
        step_lines.len() >= 10,
        "expected per-step loss lines, got:\n{out}"
    );
    assert!(step_lines.last().unwrap().contains("60/60"));
    let before = number_after(&out, "held-out loss before fine-tuning: ");
    let after = number_after(&out, "held-out loss after fine-tuning: ");
    assert!(
        after < 0.5 * before,
        "fine-tuning must clearly lower held-out loss: {before} -> {after}"
    );

    let root = tmp.path().join("runs/checkpoints");
    let latest = std::fs::read_to_string(root.join("latest")).unwrap();
    let ckpt = root.join(latest.trim());
    assert!(ckpt.join("manifest.json").is_file());
    assert!(
        out.contains(&format!("final checkpoint: {}", ckpt.display())),
        "{out}"
    );
    // No staging directory survives a successful run.
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".staging"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(wait_no_tagged(&run.tag, Duration::from_secs(5)).is_empty());

    check_data_cursors(&root);
    check_generation(&ckpt, &tmp.path().join("base"));
    let Some(py) = python() else { return };
    check_score_against_transformers(&py, &ckpt, &tmp.path().join("data/eval.jsonl"));
    let report = run_python(
        &py,
        r#"
import hashlib, json, os, sys
from safetensors.numpy import load_file
d = sys.argv[1]
cfg = json.load(open(os.path.join(d, "config.json")))
w = load_file(os.path.join(d, "model.safetensors"))
assert w["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"]), w["model.embed_tokens.weight"].shape
assert w["model.layers.0.self_attn.k_proj.weight"].shape == (cfg["num_key_value_heads"] * cfg["head_dim"], cfg["hidden_size"])
layers = {k.split(".")[2] for k in w if k.startswith("model.layers.")}
assert len(layers) == cfg["num_hidden_layers"], layers
manifest = json.load(open(os.path.join(d, "manifest.json")))
for f in manifest["files"]:
    data = open(os.path.join(d, f["path"]), "rb").read()
    assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"], f["path"]
print(len(w), cfg["model_type"], ",".join(sorted(f["path"] for f in manifest["files"])))
"#,
        &[ckpt.to_str().unwrap()],
    );
    let fields: Vec<&str> = report.split_whitespace().collect();
    // 4 layers × 9 tensors + embed + norm + lm_head.
    assert_eq!(
        fields,
        vec![
            "39",
            "llama",
            "config.json,model.safetensors,tokenizer.json,tokenizer_config.json,training_state/optimizer.safetensors,training_state/trainer_state.json"
        ],
        "python saw: {report}"
    );
}

/// Each checkpoint's trainer_state.json holds the data stream's position after its step:
/// steps × global batch (2 workers × 8) sequences drawn, all from the one dataset, first epoch.
fn check_data_cursors(root: &std::path::Path) {
    for step in [30u64, 60] {
        let path = root.join(format!("step-{step:08}/training_state/trainer_state.json"));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(state["step"], step);
        let cursor = &state["data_cursor"];
        assert_eq!(cursor["draws"], step * 16, "{path:?}: {cursor}");
        assert_eq!(
            cursor["tasks"],
            serde_json::json!([{"epoch": 0, "position": step * 16}]),
            "{path:?}"
        );
    }
}

fn worker(args: &[&str]) -> String {
    stdout_of(std::process::Command::new(bin("worker")).args(args))
}

/// Greedy decoding from the fine-tuned model continues an incident report in its trained
/// structure (a symptom, then an `action:` line, then `status: resolved ...`); the base model,
/// pretrained on general text only, does not. Content words are not checked: 60 steps leave
/// the demo model at ~0.3 nats/token, enough for the structure, not for every unit's vocabulary.
/// A report is about 135 byte-level tokens, so 100 new tokens reach its status line.
fn check_generation(ckpt: &std::path::Path, base: &std::path::Path) {
    let prompt = "INCIDENT 4242 | unit: pump-07 | severity: high\nsymptom:";
    let follows_pattern = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines.len() >= 3
            && lines[0].starts_with(' ')
            && lines[0].trim().len() >= 3
            && lines[0].chars().all(|c| c.is_ascii_lowercase() || c == ' ')
            && lines[1].starts_with("action: ")
            && lines[2].starts_with("status: resolved")
    };
    let generate = |model: &std::path::Path| {
        worker(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "100",
        ])
    };
    let tuned = generate(ckpt);
    assert!(follows_pattern(&tuned), "fine-tuned model wrote: {tuned:?}");
    let base = generate(base);
    assert!(
        !follows_pattern(&base),
        "the base model already wrote: {base:?}"
    );
}

/// `worker score` and transformers agree on every held-out text's loss and token count.
fn check_score_against_transformers(
    py: &std::path::Path,
    ckpt: &std::path::Path,
    data: &std::path::Path,
) {
    let (ckpt, data) = (ckpt.to_str().unwrap(), data.to_str().unwrap());
    let ours = worker(&["score", "--model", ckpt, "--input", data]);
    let script = repo_root().join("worker/tests/parity/hf_score.py");
    let theirs = stdout_of(
        std::process::Command::new(py)
            .arg(&script)
            .args([ckpt, data])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error"),
    );
    let parse = |text: &str| -> Vec<(f64, u64)> {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
            })
            .collect()
    };
    let (ours, theirs) = (parse(&ours), parse(&theirs));
    assert_eq!(ours.len(), theirs.len());
    assert!(ours.len() >= 100);
    for (i, ((a, n), (b, m))) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(n, m, "text {i}: token counts differ");
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "text {i}: ours {a}, transformers {b}"
        );
    }
}
