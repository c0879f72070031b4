//! Watching a run: `/metrics`, scraped while the tiny job trains, parses with Prometheus' own
//! OpenMetrics parser, its counters only increase and its values are those of the step lines;
//! `/api/status` and `<checkpoint.dir>/metrics.jsonl` hold the same history.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const JOB: &str = "{job=tiny-incidents}";

/// Step number → the loss its step line printed (4 decimals).
fn step_lines(stdout: &str) -> BTreeMap<u64, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("step")?;
            let (step, rest) = rest.trim_start().split_once('/')?;
            let loss = rest.split("| loss ").nth(1)?.split_whitespace().next()?;
            Some((step.parse().ok()?, loss.to_string()))
        })
        .collect()
}

#[test]
fn metrics_status_and_history_agree_with_the_step_lines() {
    let _serial = serial();
    let Some(python) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_example(tmp.path());
    edit_config(&config, &[("  log_every_steps: 5", "  log_every_steps: 1")]);
    let mut run = Launch::start(&config);
    let line = run.wait_for_line(Duration::from_secs(60), |l| l.starts_with("dashboard: "));
    let url = line.trim_start_matches("dashboard: ").trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let out = tmp.path().join("scrapes.json");
    let mut scraper = std::process::Command::new(&python)
        .arg(repo_root().join("tests/observe/scrape.py"))
        .arg(&url)
        .arg(&out)
        .spawn()
        .unwrap();
    let status = run.wait(Duration::from_secs(300));
    assert!(status.success(), "{}", run.stderr_text());
    assert!(scraper.wait().unwrap().success());
    let lines = step_lines(&run.stdout_text());
    assert_eq!(lines.len(), 60, "{}", run.stdout_text());

    let scraped: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let scrapes = scraped["scrapes"].as_array().unwrap();
    let state = |s: &Value, name: &str| {
        s["samples"][format!("ferrotune_job_state{{job=tiny-incidents,state={name}}}")].as_f64()
    };
    // Scrapes between the first step and the end of training (the endpoint also answers while
    // the job writes its report after "succeeded": those scrapes are checked below).
    let training: Vec<&Value> = scrapes
        .iter()
        .filter(|s| s["samples"][format!("ferrotune_step{JOB}")].as_f64() > Some(0.0))
        .filter(|s| state(s, "training") == Some(1.0))
        .collect();
    for s in scrapes
        .iter()
        .filter(|s| state(s, "succeeded") == Some(1.0))
    {
        assert_eq!(
            s["samples"][format!("ferrotune_step{JOB}")].as_f64(),
            Some(60.0)
        );
    }
    assert!(
        training.len() >= 5,
        "only {} scrapes during training",
        training.len()
    );
    for s in scrapes {
        assert!(
            s["content_type"]
                .as_str()
                .unwrap()
                .starts_with("application/openmetrics-text"),
            "{}",
            s["content_type"]
        );
    }
    // Counters (and a histogram's count, sum and buckets) never go down.
    let monotone = |name: &str| {
        name.contains("_total{")
            || name.contains("_count{")
            || name.contains("_sum{")
            || name.contains("_bucket{")
    };
    for pair in scrapes.windows(2) {
        for (name, before) in pair[0]["samples"].as_object().unwrap() {
            if !monotone(name) {
                continue;
            }
            let after = pair[1]["samples"][name].as_f64().unwrap_or(f64::NAN);
            assert!(
                after >= before.as_f64().unwrap(),
                "{name} went from {before} to {after}"
            );
        }
    }
    // Every scrape's step and loss are one of the step lines.
    for s in &training {
        let samples = &s["samples"];
        let step = samples[format!("ferrotune_step{JOB}")].as_f64().unwrap() as u64;
        let loss = samples[format!("ferrotune_loss{JOB}")].as_f64().unwrap();
        assert_eq!(
            format!("{loss:.4}"),
            lines[&step],
            "loss at step {step} in /metrics vs the step line"
        );
        let steps_total = samples[format!("ferrotune_optimizer_steps_total{JOB}")].as_f64();
        assert_eq!(steps_total, Some(step as f64));
        assert_eq!(
            samples[format!("ferrotune_total_steps{JOB}")].as_f64(),
            Some(60.0)
        );
        for other in [
            "starting",
            "rendezvous",
            "restarting",
            "succeeded",
            "failed",
        ] {
            assert_eq!(state(s, other), Some(0.0), "{other} while training");
        }
        for rank in 0..2 {
            let age = &samples
                [format!("ferrotune_heartbeat_age_seconds{{job=tiny-incidents,rank={rank}}}")];
            assert!(
                age.as_f64().is_some_and(|a| (0.0..10.0).contains(&a)),
                "rank {rank}: {age}"
            );
        }
    }

    // The history: one step record per step, as printed; evals, checkpoints, start and end.
    let history =
        std::fs::read_to_string(tmp.path().join("runs/checkpoints/metrics.jsonl")).unwrap();
    let records: Vec<Value> = history
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: BTreeMap<u64, f64> = records
        .iter()
        .filter(|r| r["type"] == "step")
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(records.iter().filter(|r| r["type"] == "step").count(), 60);
    for (step, loss) in &steps {
        assert_eq!(
            format!("{loss:.4}"),
            lines[step],
            "step {step} in metrics.jsonl"
        );
    }
    let kinds = |kind: &str| records.iter().filter(|r| r["type"] == kind).count();
    assert_eq!(
        (kinds("start"), kinds("end"), kinds("checkpoint")),
        (1, 1, 2)
    );
    assert_eq!(kinds("eval"), 2, "before and after");
    assert_eq!(records.last().unwrap()["outcome"], "succeeded");

    // /api/status from the middle of the run: the same curve, the workers, an ETA.
    let status = &scraped["status"];
    assert_eq!(status["job"], "tiny-incidents");
    let history = status["history"].as_array().unwrap();
    assert!(history.len() >= 20, "{}", history.len());
    for (i, point) in history.iter().enumerate() {
        let step = point["step"].as_u64().unwrap();
        assert_eq!(
            step,
            i as u64 + 1,
            "the curve has every step once, in order"
        );
        assert_eq!(point["loss"].as_f64().unwrap(), steps[&step], "step {step}");
    }
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    assert!(status["eta_seconds"].as_f64().is_some_and(|s| s > 0.0));
    assert_eq!(status["evals"][0]["phase"], "before");
}

/// Chromium, installed when missing (CI is root); None (skipped, saying why) where it cannot be.
fn chromium() -> Option<std::path::PathBuf> {
    let out = std::process::Command::new("bash")
        .arg(repo_root().join("tests/infra/chromium.sh"))
        .output()
        .unwrap();
    let found = out.status.success();
    if !common::netns::prerequisite(
        found,
        &format!(
            "no Chromium for the dashboard test: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    ) {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// Runs headless Chromium on `url`: the DOM after the page's script ran, and its log.
fn headless(chromium: &std::path::Path, url: &str, extra: &[&str]) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args([
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1400,1000",
        ])
        .arg("--virtual-time-budget=4000")
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of `attr` on the element with `id` in a dumped DOM, HTML entities decoded.
fn attribute(dom: &str, id: &str, attr: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let tag_end = at + dom[at..].find('>').unwrap();
    let tag = &dom[dom[..at].rfind('<').unwrap()..tag_end];
    let start = tag
        .find(&format!("{attr}=\""))
        .unwrap_or_else(|| panic!("#{id} has no {attr}: {tag}"))
        + attr.len()
        + 2;
    let value = &tag[start..start + tag[start..].find('"').unwrap()];
    value.replace("&quot;", "\"").replace("&amp;", "&")
}

#[test]
fn the_dashboard_plots_the_status_history_without_console_errors() {
    let _serial = serial();
    let Some(chromium) = chromium() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_example(tmp.path());
    let mut run = Launch::start(&config);
    let line = run.wait_for_line(Duration::from_secs(60), |l| l.starts_with("dashboard: "));
    let url = line.trim_start_matches("dashboard: ").trim().to_string();
    // Wait for some history to plot.
    run.wait_for_line(Duration::from_secs(120), |l| l.starts_with("step    20/"));
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let (dom, log) = headless(&chromium, &url, &["--dump-dom"]);
    let status: Value = serde_json::from_str(
        &std::process::Command::new(&chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
            .arg(format!("{url}api/status"))
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                // Chromium wraps a JSON document in <pre>.
                let body = text.split("<pre>").nth(1).unwrap_or(&text);
                body.split("</pre>").next().unwrap().replace("&quot;", "\"")
            })
            .unwrap(),
    )
    .unwrap();
    headless(
        &chromium,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    assert!(run.wait(Duration::from_secs(300)).success());

    assert!(
        !log.contains("CONSOLE"),
        "the page logged to its console:\n{log}"
    );
    assert!(
        !dom.contains(">connecting<"),
        "the page never loaded its status"
    );
    // Every plotted loss and learning-rate point is the status history's at that step (the
    // status was read just after the page, so it may have a few more).
    let history: BTreeMap<u64, (f64, f64)> = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let v = |k: &str| p[k].as_f64().unwrap();
            (p["step"].as_u64().unwrap(), (v("loss"), v("lr")))
        })
        .collect();
    let plotted: Vec<Vec<Vec<f64>>> =
        serde_json::from_str(&attribute(&dom, "loss-chart", "data-points")).unwrap();
    let train = &plotted[0];
    assert!(train.len() >= 20, "{} points plotted", train.len());
    for p in train {
        assert_eq!(history[&(p[0] as u64)].0, p[1], "loss at step {}", p[0]);
    }
    assert_eq!(plotted[1].len(), 1, "the held-out loss before training");
    let lr: Vec<Vec<Vec<f64>>> =
        serde_json::from_str(&attribute(&dom, "lr-chart", "data-points")).unwrap();
    assert_eq!(lr[0].len(), train.len());
    for p in &lr[0] {
        assert_eq!(history[&(p[0] as u64)].1, p[1], "lr at step {}", p[0]);
    }
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    eprintln!("dashboard screenshot: {}", shot.display());

    // After the run: `coordinator dashboard` serves the same page from the history.
    let mut after = Launch::spawn({
        let mut cmd = std::process::Command::new(bin("coordinator"));
        cmd.arg("dashboard").arg(&config);
        cmd
    });
    let line = after.wait_for_line(Duration::from_secs(30), |l| l.starts_with("dashboard: "));
    let url = line
        .trim_start_matches("dashboard: ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (dom, log) = headless(&chromium, &url, &["--dump-dom"]);
    assert!(
        !log.contains("CONSOLE"),
        "the page logged to its console:\n{log}"
    );
    assert!(dom.contains(">succeeded<"), "the finished state is shown");
    let plotted: Vec<Vec<Vec<f64>>> =
        serde_json::from_str(&attribute(&dom, "loss-chart", "data-points")).unwrap();
    let history = stdout_of(
        std::process::Command::new(bin("coordinator"))
            .args(["status", "--json"])
            .arg(&config),
    );
    let history: Value = serde_json::from_str(&history).unwrap();
    let expected: Vec<Vec<f64>> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| vec![p["step"].as_f64().unwrap(), p["loss"].as_f64().unwrap()])
        .collect();
    assert_eq!(expected.len(), 60);
    assert_eq!(
        plotted[0], expected,
        "every step of the finished run, as recorded"
    );
    assert_eq!(plotted[1].len(), 2, "held-out loss before and after");
}
