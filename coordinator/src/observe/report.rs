//! `report.md`: what fine-tuning changed, from the job's history — held-out loss and perplexity
//! per dataset before and after, and for every dataset with prompts the base model's and the
//! fine-tuned model's greedy answers side by side with the reference answer. Written into the
//! final checkpoint when the job succeeds (by the history thread), and by `coordinator report`.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

pub const FILE: &str = "report.md";

/// Per dataset: (before, after) held-out loss.
type Losses = BTreeMap<String, (Option<f64>, Option<f64>)>;
/// (dataset, index) → (prompt, reference, base answer, tuned answer).
type Answers = BTreeMap<(String, u64), [Option<String>; 4]>;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn losses(history: &[Value]) -> (Losses, Vec<String>) {
    let mut out = Losses::new();
    let mut order = Vec::new();
    for r in history.iter().filter(|r| r["type"] == "eval") {
        let phase = r["phase"].as_str().unwrap_or_default();
        for t in r["tasks"].as_array().into_iter().flatten() {
            let (Some(name), Some(loss)) = (t["name"].as_str(), t["loss"].as_f64()) else {
                continue;
            };
            if !order.iter().any(|n| n == name) {
                order.push(name.to_string());
            }
            let entry = out.entry(name.to_string()).or_default();
            match phase {
                "before" => entry.0 = Some(loss),
                "after" => entry.1 = Some(loss),
                _ => {}
            }
        }
    }
    (out, order)
}

fn answers(history: &[Value]) -> Answers {
    let mut out = Answers::new();
    for r in history.iter().filter(|r| r["type"] == "samples") {
        let slot = match r["phase"].as_str() {
            Some("before") => 2,
            Some("after") => 3,
            _ => continue,
        };
        for s in r["samples"].as_array().into_iter().flatten() {
            let key = (
                s["dataset"].as_str().unwrap_or_default().to_string(),
                s["index"].as_u64().unwrap_or(0),
            );
            let entry = out.entry(key).or_default();
            let text = |f: &str| s[f].as_str().map(str::to_string);
            entry[0] = text("prompt");
            entry[1] = text("reference");
            entry[slot] = text("answer");
        }
    }
    out
}

fn figure(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// The report's text from a resolved history (`history::read`).
pub fn render(job: &str, checkpoint: &Path, history: &[Value]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Eval report: {job}\n");
    let _ = writeln!(md, "Checkpoint: `{}`\n", checkpoint.display());
    let (losses, order) = losses(history);
    if !order.is_empty() {
        md.push_str("## Held-out loss\n\n");
        md.push_str("| dataset | loss before | loss after | change | perplexity before | perplexity after |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|\n");
        for name in &order {
            let (before, after) = losses[name];
            let change = match (before, after) {
                (Some(b), Some(a)) if b > 0.0 => format!("{:+.1} %", (a - b) / b * 100.0),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {change} | {} | {} |",
                figure(before, |v| format!("{v:.4}")),
                figure(after, |v| format!("{v:.4}")),
                figure(before, |v| format!("{:.2}", v.exp())),
                figure(after, |v| format!("{:.2}", v.exp())),
            );
        }
        md.push('\n');
    }
    let answers = answers(history);
    let mut dataset = None;
    for ((name, index), [prompt, reference, base, tuned]) in &answers {
        if dataset != Some(name) {
            dataset = Some(name);
            let _ = writeln!(
                md,
                "## Samples: {name}\n\nGreedy answers to held-out prompts of `{name}`: the base model's, the fine-tuned model's, and the reference answer.\n"
            );
        }
        let cell = |t: &Option<String>| {
            format!(
                "<pre>{}</pre>",
                escape(
                    t.as_deref()
                        .unwrap_or("(not generated in this job's history)")
                )
            )
        };
        let _ = writeln!(
            md,
            "### {name} #{}\n\n<pre>{}</pre>\n\n<table>\n<tr><th>base model</th><th>fine-tuned</th><th>reference</th></tr>\n<tr valign=\"top\"><td>{}</td><td>{}</td><td>{}</td></tr>\n</table>\n",
            index + 1,
            escape(prompt.as_deref().unwrap_or_default()),
            cell(base),
            cell(tuned),
            cell(reference),
        );
    }
    if answers.is_empty() {
        md.push_str("No samples: no dataset has held-out prompts (prompt/completion or messages with an eval split), or `data.eval_samples` is 0.\n");
    }
    md
}

/// Writes `report.md` into `checkpoint` (a temporary file, then a rename).
pub fn write(job: &str, checkpoint: &Path, history: &[Value]) -> std::io::Result<PathBuf> {
    let path = checkpoint.join(FILE);
    let tmp = checkpoint.join(format!(".{FILE}.tmp"));
    std::fs::write(&tmp, render(job, checkpoint, history))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn losses_and_answers_side_by_side() {
        let history = vec![
            json!({"type": "eval", "phase": "before", "step": 0, "tasks": [{"name": "qa", "loss": 2.0}]}),
            json!({"type": "samples", "phase": "before", "samples": [
                {"dataset": "qa", "index": 1, "prompt": "Why?", "answer": "b<1>", "reference": "ref 1"},
                {"dataset": "qa", "index": 0, "prompt": "What?", "answer": "b0", "reference": "ref 0"}]}),
            json!({"type": "eval", "phase": "after", "step": 9, "tasks": [{"name": "qa", "loss": 1.0}]}),
            json!({"type": "samples", "phase": "after", "samples": [
                {"dataset": "qa", "index": 0, "prompt": "What?", "answer": "t0", "reference": "ref 0"}]}),
        ];
        let md = render("job", Path::new("ckpt"), &history);
        assert!(
            md.contains("| qa | 2.0000 | 1.0000 | -50.0 % | 7.39 | 2.72 |"),
            "{md}"
        );
        let first = md.find("### qa #1").unwrap();
        let second = md.find("### qa #2").unwrap();
        assert!(first < second);
        assert!(
            md[first..second]
                .contains("<td><pre>b0</pre></td><td><pre>t0</pre></td><td><pre>ref 0</pre></td>"),
            "{md}"
        );
        assert!(md[second..].contains("<pre>b&lt;1&gt;</pre>"), "{md}");
        assert!(md[second..].contains("not generated"), "{md}");
    }
}
