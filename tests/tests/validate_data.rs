//! `coordinator validate` on datasets: one located message per bad line, a non-zero exit, no
//! panic; `launch` refuses the same data before starting anything; a 1 GB file is checked in
//! bounded memory.

mod common;
use common::*;
use std::io::Write;
use std::path::Path;
use std::process::Command;

const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// A job on the tiny model whose one dataset is `lines` in the messages layout.
fn job(dir: &Path, lines: &[String], with_template: bool) -> std::path::PathBuf {
    let config = tiny_example(dir);
    std::fs::write(dir.join("data/chat.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("chat.jinja"), TEMPLATE).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let start = text.find("\ndata:").unwrap();
    let end = text.find("\ntraining:").unwrap();
    let template = if with_template {
        "  chat_template_file: chat.jinja\n"
    } else {
        ""
    };
    let data = format!(
        "\ndata:\n  seq_len: 64\n{template}  datasets:\n    - name: chat\n      path: data/chat.jsonl\n      format: messages\n"
    );
    std::fs::write(
        &config,
        format!("{}{}{}", &text[..start], data, &text[end..]),
    )
    .unwrap();
    config
}

fn run(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = Command::new(bin("coordinator"))
        .args(args)
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chat(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}
    ]})
    .to_string()
}

#[test]
fn each_bad_line_is_located_and_launch_refuses_before_starting_workers() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let lines = vec![
        chat("hi", "hello"),
        r#"{"messages": [{"role": "user", "content": "hi"}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}"#
            .to_string(),
        r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}"#
            .to_string(),
        chat("q", "   "),
        r#"{"prompt": "p", "completion": "c"}"#.to_string(),
        chat("hi", "hello"),
        chat("long", &"z".repeat(200)),
        chat("fine", "ok"),
    ];
    let config = job(tmp.path(), &lines, true);
    let file = tmp.path().join("data/chat.jsonl");
    let (code, stdout, stderr) = run(&["validate"], &config);
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let expected = [
        (2, "error", "malformed JSON"),
        (3, "error", "bad role `robot`"),
        (4, "error", "no assistant turn"),
        (5, "error", "assistant answer is empty or whitespace only"),
        (6, "error", "missing field `messages`"),
        (7, "warning", "exact duplicate of line 1"),
        (8, "warning", "longer than data.seq_len + 1 = 65; truncated"),
    ];
    for (line, kind, what) in expected {
        let prefix = format!("{}:{line}: {kind}: ", file.display());
        let hits: Vec<&str> = stdout.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(hits.len(), 1, "want one `{prefix}` line in:\n{stdout}");
        assert!(hits[0].contains(what), "{}", hits[0]);
    }
    let located = stdout.lines().filter(|l| l.contains(": error: ")).count();
    assert_eq!(located, 5, "{stdout}");
    assert!(stdout.contains("5 errors, 2 warnings"), "{stdout}");
    assert!(
        stdout.contains("4 samples from 9 lines"),
        "the summary counts samples and lines: {stdout}"
    );

    // launch runs the same checks first: nothing starts, nothing is cached.
    let (code, stdout, _) = run(&["launch"], &config);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains(&format!("{}:2: error: malformed JSON", file.display())));
    let runs = tmp.path().join("runs/checkpoints");
    assert!(!runs.join("logs").exists(), "no worker may have started");
    let cached: Vec<_> = std::fs::read_dir(runs.join("data-cache"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        cached.is_empty(),
        "a rejected dataset is not cached: {cached:?}"
    );

    // A messages dataset needs a template; the tiny model has none.
    let tmp2 = tempfile::tempdir().unwrap();
    let config = job(tmp2.path(), &[chat("a", "b")], false);
    let (code, stdout, _) = run(&["validate"], &config);
    assert_eq!(code, 2);
    assert!(
        stdout.contains("has no chat_template") && stdout.contains("data.chat_template_file"),
        "{stdout}"
    );
}

/// ru_maxrss (KiB) and exit code of a child, waited for with wait4.
fn wait_with_peak_rss(child: std::process::Child) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our own unwaited child; both pointers are valid for the call.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

#[test]
fn a_gigabyte_of_jsonl_is_validated_in_bounded_memory() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_example(tmp.path());
    let big = tmp.path().join("data/big.jsonl");
    let words = [
        "pump", "valve", "seal", "leak", "motor", "bearing", "replaced", "pressure", "unit",
    ];
    let mut out = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
    let (mut bytes, mut lines) = (0u64, 0u64);
    while bytes < 1 << 30 {
        let text: Vec<&str> = (0..120)
            .map(|j| words[(lines as usize * 7 + j * 3 + j / 5) % words.len()])
            .collect();
        let line = format!("{{\"text\": \"{} #{lines}\"}}\n", text.join(" "));
        out.write_all(line.as_bytes()).unwrap();
        bytes += line.len() as u64;
        lines += 1;
    }
    out.flush().unwrap();
    drop(out);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("train: data/train.jsonl", "train: data/big.jsonl")
        .replace("  eval: data/eval.jsonl\n", "");
    std::fs::write(&config, text).unwrap();

    let mut child = Command::new(bin("coordinator"))
        .arg("validate")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let (code, peak_kib) = wait_with_peak_rss(child);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains(&format!("{lines} samples from {lines} lines")),
        "{stdout}"
    );
    let peak_mib = peak_kib / 1024;
    eprintln!("validated {} MiB in a peak of {peak_mib} MiB", bytes >> 20);
    assert!(
        peak_mib < 200,
        "validation must stream: peak RSS {peak_mib} MiB for a {} MiB file",
        bytes >> 20
    );
}
