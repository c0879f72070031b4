//! examples/instruct and examples/multitask, run as a user would: instruction fine-tuning
//! learns the answer structure and saves its chat template into the checkpoint (which
//! transformers then renders exactly as we do); the mixture reports held-out loss per task.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// examples/<name> and the tiny base model, at the same relative places, in `dir`.
fn example(dir: &Path, name: &str, steps: Option<(&str, &str)>) -> PathBuf {
    let root = repo_root().join("examples");
    copy_dir(&root.join("tiny/base"), &dir.join("tiny/base"));
    for ex in ["instruct", "multitask"] {
        for entry in std::fs::read_dir(root.join(ex)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "runs" {
                continue;
            }
            let to = dir.join(ex).join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &to);
            } else {
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(entry.path(), &to).unwrap();
            }
        }
    }
    let config = dir.join(name).join("cluster.yaml");
    if let Some((from, to)) = steps {
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains(from), "{from} not in {}", config.display());
        std::fs::write(&config, text.replace(from, to)).unwrap();
    }
    config
}

fn launch(config: &Path) -> String {
    let out = Command::new(bin("coordinator"))
        .arg("launch")
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The loss on the line that starts with `prefix` (e.g. "held-out loss before fine-tuning:").
fn loss_after(stdout: &str, prefix: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"));
    line.trim_start()[prefix.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn final_checkpoint(stdout: &str) -> PathBuf {
    PathBuf::from(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("final checkpoint: "))
            .unwrap(),
    )
}

fn generate(model: &Path, extra: &[&str], question: &str) -> String {
    stdout_of(
        Command::new(bin("worker"))
            .args(["generate", "--model", model.to_str().unwrap(), "--chat"])
            .args(extra)
            .args(["--prompt", question, "--max-new-tokens", "200"]),
    )
}

#[test]
fn instruct_example_learns_the_answer_structure_and_keeps_its_template() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = example(tmp.path(), "instruct", Some(("steps: 150", "steps: 60")));
    let stdout = launch(&config);
    let before = loss_after(&stdout, "held-out loss before fine-tuning:");
    let after = loss_after(&stdout, "held-out loss after fine-tuning:");
    assert!(after < before / 10.0, "answer loss {before} -> {after}");

    // The template the job trained with is in the checkpoint, so `--chat` needs nothing else.
    let ckpt = final_checkpoint(&stdout);
    let template_path = tmp.path().join("instruct/chat_template.jinja");
    let template = std::fs::read_to_string(&template_path).unwrap();
    let tok_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        tok_config["chat_template"].as_str(),
        Some(template.as_str())
    );

    // The eval report in the final checkpoint: the base model's answers to held-out questions
    // lack the trained structure (compliance.py's check), the fine-tuned model's have it.
    let report = ckpt.join("report.md");
    assert!(report.is_file(), "no report.md in {}", ckpt.display());
    if let Some(python) = python() {
        let script = repo_root().join("tests/observe/report_compliance.py");
        let out = stdout_of(Command::new(&python).arg(script).arg(&report));
        let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            counts["samples"], 5,
            "data.eval_samples defaults to 5: {counts}"
        );
        assert_eq!(counts["base_compliant"], 0, "{counts}");
        assert_eq!(counts["base_opening"], 0, "{counts}");
        // After 60 steps (the example trains 150) answers open as trained and some are whole
        // (here: 5 and 2 of 5; a CPU with other kernels may round differently).
        assert!(counts["tuned_opening"].as_u64() >= Some(4), "{counts}");
        assert!(counts["tuned_compliant"].as_u64() >= Some(1), "{counts}");
    }
    // `coordinator report` writes the same report again from the history.
    let before = std::fs::read_to_string(&report).unwrap();
    std::fs::remove_file(&report).unwrap();
    let again = stdout_of(Command::new(bin("coordinator")).arg("report").arg(&config));
    assert_eq!(PathBuf::from(again.trim()), report);
    assert_eq!(std::fs::read_to_string(&report).unwrap(), before);

    let question = "Hello, my lamp switch is stuck since Monday. Order A12345. Please advise.";
    let tuned = generate(&ckpt, &[], question);
    let lines: Vec<&str> = tuned.lines().collect();
    assert!(
        lines.len() >= 2
            && lines[0] == "Thank you for contacting Acme support."
            && lines[1].starts_with("Issue: "),
        "fine-tuned model answered: {tuned:?}"
    );
    let base = tmp.path().join("tiny/base");
    let untuned = generate(
        &base,
        &["--chat-template", template_path.to_str().unwrap()],
        question,
    );
    assert!(
        !untuned.contains("Thank you for contacting"),
        "the base model already answered in the structure: {untuned:?}"
    );

    // transformers renders the saved template as we trained on it.
    let Some(python) = python() else { return };
    let rendered = run_python(
        &python,
        "import sys\nfrom transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(sys.argv[1])\nprint(t.apply_chat_template([{'role': 'user', 'content': sys.argv[2]}], tokenize=False, add_generation_prompt=True), end='')",
        &[ckpt.to_str().unwrap(), question],
    );
    assert_eq!(
        rendered,
        format!("<|bos|>### user\n{question}\n### assistant\n")
    );
}

#[test]
fn multitask_example_reports_held_out_loss_per_task() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = example(tmp.path(), "multitask", Some(("steps: 60", "steps: 40")));
    let stdout = launch(&config);
    let phases: Vec<&str> = stdout
        .split("held-out loss ")
        .filter(|s| s.starts_with("before") || s.starts_with("after"))
        .collect();
    assert_eq!(phases.len(), 2, "{stdout}");
    for task in ["extract", "support"] {
        let before = loss_after(phases[0], &format!("{task}:"));
        let after = loss_after(phases[1], &format!("{task}:"));
        assert!(
            after < before / 5.0,
            "{task}: {before} -> {after}\n{stdout}"
        );
    }
    // The report has both datasets' losses and samples: prompt/completion prompts encoded as
    // in training, conversations through the chat template.
    let report = std::fs::read_to_string(final_checkpoint(&stdout).join("report.md")).unwrap();
    for task in ["extract", "support"] {
        assert!(report.contains(&format!("\n| {task} | ")), "{report}");
        assert!(report.contains(&format!("## Samples: {task}")), "{report}");
        assert_eq!(
            report.matches(&format!("### {task} #")).count(),
            5,
            "{report}"
        );
    }
}
