//! `coordinator status <cluster.yaml | checkpoint dir | URL>`: a short summary of a running or
//! finished job — from its live `/api/status` when it answers, else from `metrics.jsonl` and the
//! committed checkpoints (a job that ended, or a host that cannot reach it).

use crate::checkpoint;
use crate::observe::history;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a running job says its dashboard is (removed when it ends).
pub const DASHBOARD_FILE: &str = ".ferrotune-dashboard";

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{url} did not answer: {message}")]
    Unreachable { url: String, message: String },
    #[error("{}: no metrics.jsonl (is this the checkpoint.dir of a job that ran?): {source}", dir.display())]
    NoHistory {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The live status of the job at `url` (a dashboard address).
pub fn live(url: &str) -> Result<Value, StatusError> {
    let url = format!("{}/api/status", url.trim_end_matches('/'));
    let unreachable = |message: String| StatusError::Unreachable {
        url: url.clone(),
        message,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let text = agent
        .get(&url)
        .call()
        .map_err(|e| unreachable(e.to_string()))?
        .body_mut()
        .read_to_string()
        .map_err(|e| unreachable(e.to_string()))?;
    let mut status: Value =
        serde_json::from_str(&text).map_err(|e| unreachable(format!("not a status: {e}")))?;
    status["source"] = json!("live");
    Ok(status)
}

/// The job whose checkpoint.dir is `dir`: live when it runs and answers, else from its history.
pub fn of_dir(dir: &Path) -> Result<Value, StatusError> {
    if let Ok(url) = std::fs::read_to_string(dir.join(DASHBOARD_FILE)) {
        if let Ok(status) = live(url.trim()) {
            return Ok(status);
        }
    }
    from_history(dir)
}

/// The status `/api/status` would give, rebuilt from `metrics.jsonl` (each step once, as last
/// trained) and the committed checkpoints.
pub fn from_history(dir: &Path) -> Result<Value, StatusError> {
    let records = history::read(dir).map_err(|source| StatusError::NoHistory {
        dir: dir.to_path_buf(),
        source,
    })?;
    let of = |kind: &'static str| records.iter().filter(move |r| r["type"] == kind);
    let start = of("start").next_back().cloned().unwrap_or(Value::Null);
    let history: Vec<Value> = of("step")
        .map(|r| {
            json!({
                "step": r["step"], "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"],
                "tokens_per_s": r["input_tokens"].as_f64().unwrap_or(0.0)
                    / r["step_seconds"].as_f64().unwrap_or(1.0).max(1e-9),
            })
        })
        .collect();
    let step = history.last().and_then(|p| p["step"].as_u64()).unwrap_or(0);
    // The last run's end, if it ended after its last start.
    let last_start = records.iter().rposition(|r| r["type"] == "start");
    let ended = records
        .iter()
        .enumerate()
        .rev()
        .find(|(i, r)| r["type"] == "end" && last_start.is_none_or(|s| *i > s))
        .map(|(_, r)| r["outcome"].as_str().unwrap_or("ended").to_string());
    let checkpoints: Vec<Value> = checkpoint::committed(dir)
        .into_iter()
        .map(|(step, path)| json!({"step": step, "path": path.to_string_lossy()}))
        .collect();
    Ok(json!({
        "source": "history",
        "job": start["job"],
        "state": ended.unwrap_or_else(|| "not running (no end recorded: stopped or killed)".into()),
        "step": step,
        "total_steps": start["total_steps"],
        "world_size": start["world_size"],
        "restarts": of("restart").count(),
        "resumed": of("resumed").map(|r| r["step"].clone()).collect::<Vec<_>>(),
        "latest": history.last(),
        "history": history,
        "evals": of("eval").cloned().collect::<Vec<_>>(),
        "checkpoints": checkpoints,
        // The workers of a job that is not running are not known.
        "workers": [],
    }))
}

/// A few lines for a person.
pub fn summary(s: &Value) -> String {
    let mut out = Vec::new();
    let total = s["total_steps"].as_u64().unwrap_or(0);
    let step = s["step"].as_u64().unwrap_or(0);
    out.push(format!(
        "job {}: {} ({})",
        s["job"].as_str().unwrap_or("?"),
        s["state"].as_str().unwrap_or("?"),
        if s["source"] == "live" {
            "live"
        } else {
            "from metrics.jsonl"
        }
    ));
    let pct = if total > 0 {
        100.0 * step as f64 / total as f64
    } else {
        0.0
    };
    let mut progress = format!("step {step}/{total} ({pct:.0}%)");
    if let Some(eta) = s["eta_seconds"].as_f64() {
        progress.push_str(&format!(", about {:.0} s left", eta));
    }
    out.push(progress);
    if let Some(l) = s["latest"].as_object() {
        out.push(format!(
            "loss {:.4}, lr {:.3e}, grad norm {:.3}, {:.0} tokens/s",
            l["loss"].as_f64().unwrap_or(f64::NAN),
            l["lr"].as_f64().unwrap_or(f64::NAN),
            l["grad_norm"].as_f64().unwrap_or(f64::NAN),
            l["tokens_per_s"].as_f64().unwrap_or(0.0),
        ));
    }
    let evals = s["evals"].as_array().cloned().unwrap_or_default();
    let eval_at = |phase: &str| {
        evals
            .iter()
            .rfind(|e| e["phase"] == phase)
            .and_then(|e| e["loss"].as_f64())
    };
    match (eval_at("before"), eval_at("after")) {
        (Some(b), Some(a)) => out.push(format!("held-out loss {b:.4} -> {a:.4}")),
        (Some(b), None) => out.push(format!("held-out loss before fine-tuning {b:.4}")),
        _ => {}
    }
    let checkpoints = s["checkpoints"].as_array().cloned().unwrap_or_default();
    if let Some(c) = checkpoints.last() {
        out.push(format!(
            "{} checkpoints, newest step {}: {}",
            checkpoints.len(),
            c["step"],
            c["path"].as_str().unwrap_or("")
        ));
    }
    if let Some(w) = s["workers"].as_array() {
        for w in w {
            out.push(format!(
                "  rank {}: {} on {} (heartbeat {:.1} s ago)",
                w["rank"],
                w["worker_id"].as_str().unwrap_or("?"),
                w["host"].as_str().unwrap_or("?"),
                w["last_heartbeat_seconds"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    let restarts = s["restarts"].as_u64().unwrap_or(0);
    if restarts > 0 {
        out.push(format!("{restarts} restarts"));
    }
    out.join("\n")
}
