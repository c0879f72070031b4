//! Packed sequences: several samples share a row with per-sample positions and a block-diagonal
//! causal mask, so each sample's loss is the loss it has alone (fp32, ≤ 1e-5) — with and without
//! a sliding window, and through the checkpointed backward too.

use ferrotune_data::cache::TokenCache;
use ferrotune_data::pack::{Overlong, PackOptions};
use ferrotune_data::prepare::{cached, Prepared, Recipe};
use ferrotune_data::record::Format;
use ferrotune_data::Tokenizer;
use ferrotune_worker::data;
use ferrotune_worker::model::io::LoadedModel;
use std::path::Path;
use tch::{Device, Kind};

const SEQ_LEN: usize = 96;

fn model_dir(dir: &Path, extra: serde_json::Value) {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny/base");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
    let mut config = serde_json::json!({
        "model_type": "llama", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.1,
        "eos_token_id": 257
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Prompt/completion samples of assorted lengths (6 to 40 tokens), in file order.
fn write_data(path: &Path) {
    let lines: Vec<String> = (0..24)
        .map(|i| {
            let prompt = "q".repeat(1 + (i * 7) % 13);
            let completion = format!(" {}", "ab".repeat(1 + (i * 5) % 12));
            serde_json::json!({"prompt": prompt, "completion": completion}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

fn build(model: &Path, data: &Path, cache: &Path, packing: bool) -> TokenCache {
    let tokenizer = Tokenizer::from_model_dir(model).unwrap();
    let recipe = Recipe {
        data,
        format: Format::PromptCompletion,
        tokenizer_dir: model,
        tokenizer: &tokenizer,
        template: None,
        train_on_inputs: false,
        pack: PackOptions {
            seq_len: SEQ_LEN,
            packing,
            overlong: Overlong::Truncate,
        },
    };
    match cached(if packing { "packed" } else { "single" }, &recipe, cache).unwrap() {
        Prepared::Ready { cache, .. } => cache,
        Prepared::Rejected(r) => panic!("{r}"),
    }
}

/// (loss sum, labelled tokens) of every sample, in order, from batches of whole caches.
fn per_sample_losses(model: &LoadedModel, cache: &TokenCache) -> Vec<(f64, i64)> {
    let rows = data::rows(cache, 0..cache.len());
    let b = data::batch(&rows, SEQ_LEN, 258, Device::Cpu);
    let losses = tch::no_grad(|| {
        model
            .model
            .token_losses(&b.input_ids, &b.labels, b.packing.as_ref())
    });
    let losses = Vec::<f64>::try_from(losses.to_kind(Kind::Double).reshape([-1])).unwrap();
    let labels = Vec::<i64>::try_from(b.labels.reshape([-1])).unwrap();
    let mut out = Vec::new();
    let mut read = 0;
    for (r, samples) in rows.iter().enumerate() {
        let mut at = r * SEQ_LEN;
        for (tokens, _) in samples {
            let n = tokens.len() - 1;
            read += n as i64;
            let (mut sum, mut count) = (0.0, 0);
            for i in at..at + n {
                if labels[i] != -100 {
                    sum += losses[i];
                    count += 1;
                }
            }
            out.push((sum, count));
            at += n;
        }
    }
    // The counts behind the step lines' tok/s and learned/s: padding is neither.
    assert_eq!(b.input_count, read, "tokens read");
    let learned: i64 = out.iter().map(|(_, n)| n).sum();
    assert_eq!(b.label_count, learned, "learned tokens");
    out
}

fn check(extra: serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("model");
    std::fs::create_dir_all(&model_path).unwrap();
    model_dir(&model_path, extra);
    let data_path = dir.path().join("pc.jsonl");
    write_data(&data_path);
    let cache_root = dir.path().join("cache");
    tch::manual_seed(3);
    let model = LoadedModel::load(&model_path, true, Device::Cpu).unwrap();

    let packed = build(&model_path, &data_path, &cache_root, true);
    let single = build(&model_path, &data_path, &cache_root, false);
    assert!(
        packed.len() * 2 <= single.len(),
        "packing must put several samples in a row ({} vs {})",
        packed.len(),
        single.len()
    );
    let a = per_sample_losses(&model, &packed);
    let b = per_sample_losses(&model, &single);
    assert_eq!(a.len(), 24);
    assert_eq!(a.len(), b.len());
    for (i, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate() {
        assert_eq!(na, nb, "sample {i}: labelled tokens");
        let rel = (la - lb).abs() / lb.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "sample {i}: packed {la} vs alone {lb} ({rel:e})"
        );
    }

    // The checkpointed backward on a packed batch gives the plain backward's gradients.
    let rows = data::rows(&packed, 0..packed.len());
    let batch = data::batch(&rows, SEQ_LEN, 258, Device::Cpu);
    let params = model.named_parameters();
    let grads = |checkpointed: bool| {
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let (x, y, packing) = (&batch.input_ids, &batch.labels, batch.packing.as_ref());
        if checkpointed {
            model
                .model
                .loss_sum_backward_checkpointed(x, y, packing, 1.0);
        } else {
            model.model.loss_sum_packed(x, y, packing).0.backward();
        }
        params
            .iter()
            .map(|(_, p)| p.grad().copy())
            .collect::<Vec<_>>()
    };
    let plain = grads(false);
    let ckpt = grads(true);
    for ((name, _), (g1, g2)) in params.iter().zip(plain.iter().zip(&ckpt)) {
        let rel =
            (g1 - g2).abs().max().double_value(&[]) / g1.abs().max().double_value(&[]).max(1e-12);
        assert!(
            rel <= 1e-4,
            "{name}: checkpointed gradient differs by {rel:e}"
        );
    }
}

#[test]
fn packed_samples_have_the_loss_they_have_alone() {
    check(serde_json::json!({}));
}

#[test]
fn packing_respects_a_sliding_window() {
    check(serde_json::json!({"model_type": "mistral", "sliding_window": 6}));
}
