//! Parity with Hugging Face transformers (fp32): logits, loss, every gradient and a 10-step
//! AdamW trajectory on small random Llama, Qwen2, Qwen3, Gemma 2, Gemma 3 and Mistral models that transformers created
//! and saved (tests/parity/hf_goldens.py); and checkpoints we write load back in transformers
//! with the logits our model computes.

mod common;

use common::{goldens, read_tensors, reference_python, rel_err, run_reference};
use ferrotune_worker::model::io::{weight_files, LoadedModel, SaveOptions};
use ferrotune_worker::model::DType;
use ferrotune_worker::optim::{AdamW, AdamWConfig};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const CASES: &[&str] = &[
    "gemma2_softcap",
    "gemma3_text_sliding",
    "llama_gqa_rope_llama3",
    "llama_tied_bias_bf16",
    "mistral_window_head_dim",
    "qwen2_bias_tied",
    "qwen3_qk_norm",
];

struct Case {
    name: &'static str,
    dir: PathBuf,
    golden: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn cases() -> Option<Vec<Case>> {
    let root = goldens()?;
    Some(
        CASES
            .iter()
            .map(|&name| {
                let dir = root.join(name);
                let meta = std::fs::read_to_string(dir.join("case.json")).unwrap();
                Case {
                    name,
                    golden: read_tensors(&dir.join("goldens.safetensors")),
                    meta: serde_json::from_str(&meta).unwrap(),
                    dir,
                }
            })
            .collect(),
    )
}

impl Case {
    fn load(&self) -> LoadedModel {
        LoadedModel::load(&self.dir.join("model"), false, Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn g(&self, key: &str) -> &Tensor {
        self.golden
            .get(key)
            .unwrap_or_else(|| panic!("{}: no golden `{key}`", self.name))
    }

    fn mean_loss(model: &LoadedModel, ids: &Tensor, labels: &Tensor) -> Tensor {
        let (sum, count) = model.model.loss_sum(ids, labels);
        sum / count as f64
    }
}

fn check(failures: &mut Vec<String>, what: String, err: f64, bound: f64) {
    // NaN fails too.
    if err.is_nan() || err > bound {
        failures.push(format!("{what}: relative error {err:.3e} > {bound:.0e}"));
    }
}

/// Every parameter's gradient against transformers' (≤ 1e-4 relative).
fn check_grads(failures: &mut Vec<String>, case: &Case, model: &LoadedModel, what: &str) {
    for (name, p) in model.named_parameters() {
        check(
            failures,
            format!("{} {what} {name}", case.name),
            rel_err(&p.grad(), case.g(&format!("grad.{name}"))),
            1e-4,
        );
    }
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    let Some(cases) = cases() else { return };
    let mut failures = Vec::new();
    for case in &cases {
        if case.meta["sharded"] == true {
            assert!(weight_files(&case.dir.join("model")).unwrap().len() > 1);
        }
        let model = case.load();
        let (ids, labels) = (case.g("input_ids"), case.g("labels"));
        let logits = model.model.forward(ids);
        check(
            &mut failures,
            format!("{} logits", case.name),
            rel_err(&logits, case.g("logits")),
            1e-5,
        );
        let loss = Case::mean_loss(&model, ids, labels);
        check(
            &mut failures,
            format!("{} loss", case.name),
            rel_err(&loss, case.g("loss")),
            1e-6,
        );
        loss.backward();
        let ours: BTreeSet<String> = model
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let theirs: BTreeSet<String> = case
            .golden
            .keys()
            .filter_map(|k| k.strip_prefix("grad.").map(String::from))
            .collect();
        assert_eq!(
            ours, theirs,
            "{}: parameter names differ from transformers'",
            case.name
        );
        check_grads(&mut failures, case, &model, "grad");

        // Activation checkpointing recomputes layers in backward: same gradients.
        let model = case.load();
        let count = labels.ne(-100).sum(Kind::Int64).int64_value(&[]);
        let loss_sum =
            model
                .model
                .loss_sum_backward_checkpointed(ids, labels, None, 1.0 / count as f64);
        check(
            &mut failures,
            format!("{} checkpointed loss", case.name),
            (loss_sum / count as f64 - case.g("loss").double_value(&[])).abs()
                / case.g("loss").double_value(&[]),
            1e-6,
        );
        check_grads(&mut failures, case, &model, "checkpointed grad");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn adamw_from(meta: &serde_json::Value) -> (AdamWConfig, f64) {
    let a = &meta["adamw"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    (
        AdamWConfig {
            beta1: f(&a["betas"][0]),
            beta2: f(&a["betas"][1]),
            eps: f(&a["eps"]),
            weight_decay: f(&a["weight_decay"]),
        },
        f(&a["lr"]),
    )
}

/// Runs the golden AdamW trajectory with our optimizer; returns the trained model.
fn train_trajectory(case: &Case, failures: &mut Vec<String>) -> LoadedModel {
    let model = case.load();
    let (config, lr) = adamw_from(&case.meta);
    let mut optimizer = AdamW::new(model.named_parameters(), config);
    let steps = case.meta["steps"].as_u64().unwrap();
    let golden_losses = case.g("traj.losses");
    for step in 0..steps {
        let ids = case.g(&format!("traj.input_ids.{step}"));
        let labels = case.g(&format!("traj.labels.{step}"));
        let loss = Case::mean_loss(&model, ids, labels);
        loss.backward();
        optimizer.step(lr);
        optimizer.zero_grad();
        check(
            failures,
            format!("{} trajectory loss at step {}", case.name, step + 1),
            rel_err(&loss, &golden_losses.get(step as i64)),
            1e-4,
        );
    }
    for (name, p) in model.named_parameters() {
        // The goldens use transformers' SDPA attention, the kernel we call. Against its eager
        // attention the Qwen2 MQA key bias lands 7e-4 away after 10 steps, in torch itself: that
        // bias's gradient mostly cancels, and Adam turns the kernels' different fp32 rounding
        // residue into full-size steps.
        check(
            failures,
            format!("{} parameter {name} after {steps} AdamW steps", case.name),
            rel_err(&p, case.g(&format!("final.{name}"))),
            1e-4,
        );
    }
    model
}

#[test]
fn adamw_trajectory_matches_torch() {
    let Some(cases) = cases() else { return };
    let mut failures = Vec::new();
    for case in &cases {
        train_trajectory(case, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Saves `model` with our writer, asks transformers for its logits on `ids`, returns them.
struct Export {
    model_dir: PathBuf,
    ids: PathBuf,
    out: PathBuf,
}

fn export(
    model: &LoadedModel,
    source: &Path,
    dir: &Path,
    options: SaveOptions,
    ids: &Tensor,
) -> Export {
    let model_dir = dir.join("model");
    model.save_pretrained(&model_dir, source, &options).unwrap();
    let ids_path = dir.join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", ids)], &ids_path).unwrap();
    Export {
        model_dir,
        ids: ids_path,
        out: dir.join("logits.safetensors"),
    }
}

#[test]
fn our_checkpoints_load_in_transformers_with_our_logits() {
    let Some(cases) = cases() else { return };
    let python = reference_python().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let source = case.dir.join("model");
        let ids = case.g("input_ids");
        // Load (sharded or bf16) -> save sharded fp32 -> transformers: the very same logits.
        let loaded = case.load();
        let round_trip = export(
            &loaded,
            &source,
            &tmp.path().join(format!("{}-roundtrip", case.name)),
            SaveOptions {
                dtype: DType::F32,
                max_shard_bytes: 30_000,
            },
            ids,
        );
        assert!(weight_files(&round_trip.model_dir).unwrap().len() > 1);
        jobs.push((case, round_trip, case.g("logits").shallow_clone(), 0.0));
        // Fine-tuned by our optimizer -> saved -> transformers gives our worker's logits.
        let tuned = train_trajectory(case, &mut failures);
        let ours = tch::no_grad(|| tuned.model.forward(ids));
        let exported = export(
            &tuned,
            &source,
            &tmp.path().join(format!("{}-tuned", case.name)),
            SaveOptions::default(),
            ids,
        );
        jobs.push((case, exported, ours, 1e-5));
    }
    let spec: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(_, e, _, _)| {
            serde_json::json!({"model_dir": e.model_dir, "ids": e.ids, "out": e.out})
        })
        .collect();
    let jobs_file = tmp.path().join("jobs.json");
    std::fs::write(&jobs_file, serde_json::to_string(&spec).unwrap()).unwrap();
    run_reference(&python, "hf_logits.py", &[&jobs_file]);
    for (case, export, expected, bound) in &jobs {
        let theirs = &read_tensors(&export.out)["logits"];
        check(
            &mut failures,
            format!(
                "{} logits in transformers of {}",
                case.name,
                export.model_dir.display()
            ),
            rel_err(theirs, expected),
            *bound,
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
