//! Gemma 3's config.json as transformers 4 wrote it (the Hub's files: `rope_theta`,
//! `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`) and as transformers 5
//! writes it (`rope_parameters` per layer type, `layer_types`) read to the same options; what
//! Gemma 3 does not do (Gemma 2's attention soft-capping) refused by name.

use ferrotune_worker::model::config::{Family, RopeScaling};
use ferrotune_worker::model::ModelConfig;
use serde_json::{json, Value};

fn base() -> Value {
    json!({"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 6, "num_attention_heads": 2,
        "num_key_value_heads": 1})
}

fn with(extra: Value) -> Value {
    let mut v = base();
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn gemma3_reads_the_same_from_both_config_layouts() {
    let hub = ModelConfig::from_json(
        with(json!({"rope_theta": 1000000, "rope_local_base_freq": 10000,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 512,
            "sliding_window_pattern": 3, "query_pre_attn_scalar": 256,
            "final_logit_softcapping": null, "attn_logit_softcapping": null})),
        "hub/config.json",
    )
    .unwrap();
    let v5 = ModelConfig::from_json(
        with(json!({"sliding_window": 512, "query_pre_attn_scalar": 256,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
            "sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
        }})),
        "v5/config.json",
    )
    .unwrap();
    for c in [&hub, &v5] {
        assert_eq!(c.family, Family::Gemma3);
        let g = c.gemma.as_ref().unwrap();
        assert_eq!(g.sliding_layers, [true, true, false, true, true, false]);
        assert_eq!(g.local_rope, Some((10000.0, RopeScaling::None)));
        assert_eq!(g.attn_logit_softcapping, None);
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(c.sliding_window, Some(512));
        assert!(c.qk_norm && c.tie_word_embeddings);
    }
    // Class defaults: head_dim 256, every 6th layer global, windows of 4096.
    let plain = ModelConfig::from_json(base(), "config.json").unwrap();
    assert_eq!(plain.head_dim(), 256);
    let g = plain.gemma.unwrap();
    assert_eq!(g.sliding_layers, [true, true, true, true, true, false]);
    assert_eq!(g.query_pre_attn_scalar, 256.0);
    assert_eq!(plain.sliding_window, Some(4096));
}

#[test]
fn what_gemma3_does_not_do_is_refused_by_name() {
    for (extra, field, needle) in [
        (
            json!({"attn_logit_softcapping": 50.0}),
            "attn_logit_softcapping",
            "gemma2",
        ),
        (
            json!({"hidden_activation": "gelu"}),
            "hidden_activation",
            "gelu_pytorch_tanh",
        ),
        (
            json!({"layer_types": ["full_attention"]}),
            "layer_types",
            "1 entries for 6 layers",
        ),
        (
            json!({"use_bidirectional_attention": true}),
            "use_bidirectional_attention",
            "causal",
        ),
    ] {
        let err = ModelConfig::from_json(with(extra), "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains(field) && err.contains(needle), "{err}");
    }
    let err = ModelConfig::from_json(with(json!({"model_type": "gemma"})), "config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`gemma` is not supported") && err.contains("gemma3_text"),
        "{err}"
    );
}

#[test]
fn gemma2_has_its_class_defaults_and_no_local_rope() {
    let two = ModelConfig::from_json(with(json!({"model_type": "gemma2"})), "config.json").unwrap();
    assert_eq!(two.family, Family::Gemma2);
    assert!(!two.qk_norm && two.tie_word_embeddings);
    let g = two.gemma.unwrap();
    assert_eq!(g.sliding_layers, [true, false, true, false, true, false]);
    assert_eq!(g.local_rope, None);
    assert_eq!(
        (g.attn_logit_softcapping, g.final_logit_softcapping),
        (Some(50.0), Some(30.0))
    );
    // null turns a cap off, as in transformers.
    let off = ModelConfig::from_json(
        with(json!({"model_type": "gemma2", "attn_logit_softcapping": null})),
        "config.json",
    )
    .unwrap();
    assert_eq!(off.gemma.unwrap().attn_logit_softcapping, None);
}
