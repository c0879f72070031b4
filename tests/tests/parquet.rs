//! Parquet datasets, written by pyarrow as pandas and `datasets` write them: the same records as
//! JSON Lines give the same report and byte-identical caches in all three layouts, a job trains
//! on them, `worker score` reads them, and bad rows, damaged files and codecs we do not build
//! get clear messages.

mod common;
use common::*;
use ferrotune_data::chat::ChatTemplate;
use ferrotune_data::pack::{Overlong, PackOptions};
use ferrotune_data::prepare::{cached, Prepared, Recipe};
use ferrotune_data::record::Format;
use ferrotune_data::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;

/// JSONL -> Parquet with pyarrow: `src dst codec row_group_size [null_field_at_row field]`.
const TO_PARQUET: &str = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
src, dst, codec, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(src, encoding="utf-8") if l.strip()]
if len(sys.argv) > 6:
    rows[int(sys.argv[5]) - 1][sys.argv[6]] = None
pq.write_table(pa.Table.from_pylist(rows), dst, compression=codec, row_group_size=group)
"#;

fn to_parquet(python: &Path, src: &Path, dst: &Path, codec: &str, group: usize, null: &[&str]) {
    let mut args = vec![
        src.to_str().unwrap().to_string(),
        dst.to_str().unwrap().to_string(),
        codec.to_string(),
        group.to_string(),
    ];
    args.extend(null.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_python(python, TO_PARQUET, &args);
}

fn cache_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["tokens.bin", "targets.bin", "samples.bin", "sequences.bin"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

#[test]
fn parquet_gives_the_caches_jsonl_gives_and_a_job_trains_on_it() {
    let _serial = serial();
    let Some(python) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let examples = repo_root().join("examples");
    let base = examples.join("tiny/base");
    let tokenizer = Tokenizer::from_model_dir(&base).unwrap();
    let source = std::fs::read_to_string(examples.join("instruct/chat_template.jinja")).unwrap();
    let template = ChatTemplate::resolve(&tokenizer, Some(&source), &Default::default())
        .unwrap()
        .unwrap();
    // One file per layout, each with another codec and several row groups.
    let cases = [
        ("tiny/data/train.jsonl", Format::Text, "snappy", 160, false),
        (
            "instruct/data/train.jsonl",
            Format::Messages,
            "zstd",
            640,
            true,
        ),
        (
            "multitask/data/extract_train.jsonl",
            Format::PromptCompletion,
            "gzip",
            640,
            true,
        ),
    ];
    for (i, (file, format, codec, seq_len, packing)) in cases.into_iter().enumerate() {
        let jsonl = examples.join(file);
        let parquet = tmp.path().join(format!("case{i}.parquet"));
        to_parquet(&python, &jsonl, &parquet, codec, 300, &[]);
        let build = |data: &Path, name: &str| {
            let recipe = Recipe {
                data,
                format,
                tokenizer_dir: &base,
                tokenizer: &tokenizer,
                template: Some(&template),
                train_on_inputs: false,
                pack: PackOptions {
                    seq_len,
                    packing,
                    overlong: Overlong::Truncate,
                },
            };
            match cached(name, &recipe, &tmp.path().join("cache")).unwrap() {
                Prepared::Ready { cache, report, .. } => (cache, report),
                Prepared::Rejected(r) => panic!("{name}: {r}"),
            }
        };
        let (a, mut ra) = build(&jsonl, "jsonl");
        let (b, mut rb) = build(&parquet, "parquet");
        assert_ne!(a.dir, b.dir, "different bytes, different cache keys");
        assert!(ra.samples >= 1000, "{file}: {} samples", ra.samples);
        (ra.name, ra.path) = (String::new(), String::new());
        (rb.name, rb.path) = (String::new(), String::new());
        assert_eq!(ra, rb, "{file}: reports differ");
        assert!(
            cache_files(&a.dir) == cache_files(&b.dir),
            "{file} ({codec}): the Parquet cache differs from the JSON Lines one"
        );
    }

    // The tiny job with its train and eval sets in Parquet: validated, cached, trained on.
    let config = tiny_example(tmp.path());
    let data = tmp.path().join("data");
    for name in ["train", "eval"] {
        let src = data.join(format!("{name}.jsonl"));
        to_parquet(
            &python,
            &src,
            &data.join(format!("{name}.parquet")),
            "snappy",
            100,
            &[],
        );
    }
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("data/train.jsonl", "data/train.parquet")
        .replace("data/eval.jsonl", "data/eval.parquet")
        .replace("steps: 60", "steps: 8")
        .replace("every_steps: 30", "every_steps: 8");
    std::fs::write(&config, text).unwrap();
    let out = stdout_of(
        Command::new(bin("coordinator"))
            .arg("validate")
            .arg(&config),
    );
    assert!(
        out.contains("train.parquet): 1500 samples from 1500 lines")
            && out.contains("eval.parquet): 120 samples"),
        "{out}"
    );
    let mut launch = Launch::start(&config);
    let status = launch.wait(std::time::Duration::from_secs(300));
    let out = launch.stdout_text();
    assert!(status.success(), "{out}\n{}", launch.stderr_text());
    let line = out
        .lines()
        .find(|l| l.starts_with("held-out loss: "))
        .unwrap_or_else(|| panic!("no before/after line in:\n{out}"));
    let losses: Vec<f64> = line["held-out loss: ".len()..]
        .split(" -> ")
        .map(|s| s.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        losses[1] < losses[0] * 0.8,
        "8 steps must lower the loss: {line}"
    );
}

fn validate(config: &Path) -> (i32, String) {
    let out = Command::new(bin("coordinator"))
        .arg("validate")
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code().unwrap_or(-1), text)
}

/// The tiny job reading its training data from `train` (eval unchanged), `format` if given.
fn job_on(dir: &Path, train: &Path, format: Option<&str>) -> PathBuf {
    let config = tiny_example(dir);
    let mut line = format!("train: {}", train.display());
    if let Some(f) = format {
        line += &format!("\n  format: {f}");
    }
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("train: data/train.jsonl", &line);
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn bad_rows_damaged_files_and_other_codecs_get_clear_messages() {
    let _serial = serial();
    let Some(python) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("pc.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            let completion = if i == 4 {
                "   ".into()
            } else {
                format!(" ok {i}")
            };
            serde_json::json!({"prompt": format!("q{i}"), "completion": completion}).to_string()
        })
        .collect();
    std::fs::write(&src, rows.join("\n")).unwrap();

    // Row 3's completion is null and row 5's is blank: each error names file and row.
    let bad = tmp.path().join("bad.parquet");
    to_parquet(&python, &src, &bad, "snappy", 4, &["3", "completion"]);
    let (code, out) = validate(&job_on(&tmp.path().join("a"), &bad, None));
    assert_eq!(code, 2, "{out}");
    for (row, what) in [(3, "`completion`"), (5, "empty or whitespace only")] {
        let prefix = format!("{}:{row}: error: ", bad.display());
        let hit = out.lines().find(|l| l.starts_with(&prefix));
        assert!(
            hit.is_some_and(|l| l.contains(what)),
            "want `{prefix}...{what}` in:\n{out}"
        );
    }
    assert!(out.contains("2 errors"), "{out}");

    // A truncated file: refused, with and without `format:` (which otherwise reads row 1).
    let good = tmp.path().join("good.parquet");
    to_parquet(&python, &src, &good, "snappy", 4, &[]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = tmp.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    for (sub, format) in [("b", Some("prompt_completion")), ("c", None)] {
        let (code, out) = validate(&job_on(&tmp.path().join(sub), &cut, format));
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&cut.display().to_string()) && out.contains("not a readable Parquet file"),
            "format {format:?}:\n{out}"
        );
    }

    // brotli is not built in: the message names the codecs we read and how to re-save.
    let brotli = tmp.path().join("brotli.parquet");
    to_parquet(&python, &src, &brotli, "brotli", 4, &[]);
    let (code, out) = validate(&job_on(
        &tmp.path().join("d"),
        &brotli,
        Some("prompt_completion"),
    ));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("brotli") && out.contains("snappy, zstd") && out.contains("to_parquet"),
        "{out}"
    );
}
