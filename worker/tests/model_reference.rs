//! The Llama forward pass against a slow, obvious re-implementation written from the math,
//! reading parameters by their Hugging Face names.

use ferrotune_worker::model::io::{weight_files, LoadedModel, SaveOptions};
use ferrotune_worker::model::DType;
use ferrotune_worker::model::ModelConfig;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

fn write_config(dir: &std::path::Path, tie: bool) -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 37, "hidden_size": 24, "intermediate_size": 40,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 4, "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": tie,
        "initializer_range": 0.2
    });
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    ModelConfig::from_file(&dir.join("config.json")).unwrap()
}

fn rms_norm_slow(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.square().mean_dim(-1, true, Kind::Float);
    x / (ms + eps).sqrt() * w
}

/// Rotates each (i, i + d/2) pair of the last dimension by angle pos * theta^(-2i/d).
fn rope_slow(x: &Tensor, theta: f64) -> Tensor {
    let (_, s, d) = x.size3().unwrap();
    let half = d / 2;
    let out = x.copy();
    for pos in 0..s {
        for i in 0..half {
            let angle = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
            let (c, sn) = (angle.cos(), angle.sin());
            let a = x.narrow(1, pos, 1).narrow(2, i, 1);
            let b = x.narrow(1, pos, 1).narrow(2, i + half, 1);
            out.narrow(1, pos, 1)
                .narrow(2, i, 1)
                .copy_(&(&a * c - &b * sn));
            out.narrow(1, pos, 1)
                .narrow(2, i + half, 1)
                .copy_(&(&a * sn + &b * c));
        }
    }
    out
}

fn forward_slow(p: &HashMap<String, Tensor>, cfg: &ModelConfig, ids: &[i64]) -> Tensor {
    let s = ids.len() as i64;
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim());
    let w = |n: &str| p[n].shallow_clone();
    let mut x = w("model.embed_tokens.weight").index_select(0, &Tensor::from_slice(ids)); // (seq, hidden)
    let mask = Tensor::ones([s, s], (Kind::Float, Device::Cpu)).triu(1) * -1e9;
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{l}");
        let h = rms_norm_slow(
            &x,
            &w(&format!("{pre}.input_layernorm.weight")),
            cfg.rms_norm_eps,
        );
        let proj = |name: &str, n: i64| {
            h.matmul(&w(&format!("{pre}.self_attn.{name}.weight")).tr())
                .view([s, n, hd])
                .transpose(0, 1)
        };
        let q = rope_slow(&proj("q_proj", nh), cfg.rope_theta); // (heads, seq, head_dim)
        let k = rope_slow(&proj("k_proj", nkv), cfg.rope_theta);
        let v = proj("v_proj", nkv);
        let mut heads = Vec::new();
        for head in 0..nh {
            let kv = head / (nh / nkv);
            let scores = q.get(head).matmul(&k.get(kv).tr()) / (hd as f64).sqrt() + &mask;
            heads.push(scores.softmax(-1, Kind::Float).matmul(&v.get(kv)));
        }
        let attn =
            Tensor::cat(&heads, 1).matmul(&w(&format!("{pre}.self_attn.o_proj.weight")).tr());
        x += attn;
        let h = rms_norm_slow(
            &x,
            &w(&format!("{pre}.post_attention_layernorm.weight")),
            cfg.rms_norm_eps,
        );
        let gate = h.matmul(&w(&format!("{pre}.mlp.gate_proj.weight")).tr());
        let up = h.matmul(&w(&format!("{pre}.mlp.up_proj.weight")).tr());
        let act = &gate * gate.sigmoid() * up;
        x = &x + act.matmul(&w(&format!("{pre}.mlp.down_proj.weight")).tr());
    }
    let x = rms_norm_slow(&x, &w("model.norm.weight"), cfg.rms_norm_eps);
    let head = if cfg.tie_word_embeddings {
        w("model.embed_tokens.weight")
    } else {
        w("lm_head.weight")
    };
    x.matmul(&head.tr())
}

fn check(tie: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), tie);
    tch::manual_seed(11);
    let model = LoadedModel::load(dir.path(), true, Device::Cpu).unwrap();
    let params: HashMap<String, Tensor> = model.named_parameters().into_iter().collect();
    assert_eq!(params.contains_key("lm_head.weight"), !tie);
    assert!(params.contains_key("model.layers.1.self_attn.k_proj.weight"));
    assert_eq!(
        params["model.layers.0.self_attn.k_proj.weight"].size(),
        vec![2 * 4, 24]
    );

    let ids = [3i64, 17, 0, 36, 5, 5, 21, 9];
    let fast =
        tch::no_grad(|| model.model.forward(&Tensor::from_slice(&ids).unsqueeze(0))).squeeze_dim(0);
    let slow = tch::no_grad(|| forward_slow(&params, &cfg, &ids));
    let diff = (&fast - &slow).abs().max().double_value(&[]);
    let scale = slow.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "tie={tie}: max diff {diff} (scale {scale})"
    );
}

#[test]
fn forward_matches_slow_reference_with_gqa_and_separate_head() {
    check(false);
}

#[test]
fn forward_matches_slow_reference_with_tied_embeddings() {
    check(true);
}

#[test]
fn logits_do_not_depend_on_later_tokens() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), false);
    let model = LoadedModel::load(dir.path(), true, Device::Cpu).unwrap();
    let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).unsqueeze(0);
    let b = Tensor::from_slice(&[1i64, 2, 3, 30, 31, 32]).unsqueeze(0);
    let (la, lb) = tch::no_grad(|| (model.model.forward(&a), model.model.forward(&b)));
    assert!(la
        .narrow(1, 0, 3)
        .allclose(&lb.narrow(1, 0, 3), 1e-6, 1e-6, false));
    assert!(!la
        .narrow(1, 3, 1)
        .allclose(&lb.narrow(1, 3, 1), 1e-3, 1e-3, false));
}

#[test]
fn saved_weights_load_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), false);
    tch::manual_seed(5);
    let a = LoadedModel::load(dir.path(), true, Device::Cpu).unwrap();
    // One file, shards of ~1 KB (several tensors each, the embedding alone), and bfloat16.
    for (dtype, max_shard_bytes, sharded) in [
        (DType::F32, 5_000_000_000, false),
        (DType::F32, 1024, true),
        (DType::Bf16, 2048, true),
    ] {
        let out = tempfile::tempdir().unwrap();
        let options = SaveOptions {
            dtype,
            max_shard_bytes,
        };
        a.save_pretrained(out.path(), dir.path(), &options).unwrap();
        let shards = weight_files(out.path()).unwrap();
        assert_eq!(
            shards.len() > 1,
            sharded,
            "{dtype:?} at {max_shard_bytes} bytes"
        );
        let b = LoadedModel::load(out.path(), false, Device::Cpu).unwrap();
        assert_eq!(b.config.dtype, Some(dtype));
        for ((na, ta), (nb, tb)) in a.named_parameters().iter().zip(b.named_parameters().iter()) {
            assert_eq!(na, nb);
            let expected = ta.to_kind(dtype.kind()).to_kind(Kind::Float);
            assert!(
                tb.equal(&expected),
                "{na} differs after a {dtype:?} round trip"
            );
        }
    }
}

#[test]
fn unsupported_config_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let refusal = |config: &str| {
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        LoadedModel::load(dir.path(), true, Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    let err = refusal(
        r#"{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
    );
    assert!(
        err.contains("`model_type`") && err.contains("gpt2"),
        "{err}"
    );
    let err = refusal(r#"{"model_type": "llama", "vocab_size": 10}"#);
    assert!(
        err.contains("`hidden_size`") && err.contains("missing"),
        "{err}"
    );
}
