use super::*;
use serde_json::json;

/// Parameter counts transformers reports (`sum(p.numel() for p in model.parameters())`) for
/// published configs.
#[test]
fn parameter_counts_match_published_models() {
    let llama2_7b = json!({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32});
    assert_eq!(
        Shape::from_json(&llama2_7b).unwrap().parameters(),
        6_738_415_616
    );
    let llama31_8b = json!({"vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8});
    assert_eq!(
        Shape::from_json(&llama31_8b).unwrap().parameters(),
        8_030_261_248
    );
    let llama32_1b = json!({"vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": true});
    assert_eq!(
        Shape::from_json(&llama32_1b).unwrap().parameters(),
        1_235_814_400
    );
    // Qwen2: q/k/v biases, tied embeddings.
    let qwen25_05b = json!({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "tie_word_embeddings": true});
    assert_eq!(
        Shape::from_json(&qwen25_05b).unwrap().parameters(),
        494_032_768
    );
    // Qwen3: per-head q/k norms, head_dim 128 (its class default) wider than hidden / heads.
    let qwen3_06b = json!({"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "tie_word_embeddings": true});
    assert_eq!(
        Shape::from_json(&qwen3_06b).unwrap().parameters(),
        596_049_920
    );
    // Gemma 3 1B: four norms per layer, q/k norms, head_dim 256 (its default), tied by default;
    // transformers counts 999,885,952.
    let gemma3_1b = json!({"model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1});
    assert_eq!(
        Shape::from_json(&gemma3_1b).unwrap().parameters(),
        999_885_952
    );
    // Gemma 2 2B: four norms per layer, no q/k norms; transformers counts 2,614,341,888.
    let gemma2_2b = json!({"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
        "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
        "num_key_value_heads": 4});
    assert_eq!(
        Shape::from_json(&gemma2_2b).unwrap().parameters(),
        2_614_341_888
    );
}

#[test]
fn a_bad_field_is_named() {
    let err = Shape::from_json(&json!({"vocab_size": 10, "hidden_size": "big"})).unwrap_err();
    assert_eq!(err.0, "hidden_size");
    let err = Shape::from_json(&json!({"hidden_size": 8, "num_attention_heads": 2})).unwrap_err();
    assert_eq!(err.0, "vocab_size");
}

fn settings() -> Settings {
    Settings {
        micro_batch: 1,
        seq_len: 4096,
        bf16: true,
        activation_checkpointing: true,
        gpu: true,
        packing: false,
        periodic_checkpoints: true,
        zero_stage: 0,
        world_size: 8,
    }
}

fn plan_of(shape: &Shape, s: &Settings, capacity: u64) -> Plan {
    let (writer, other) = estimate(shape, s);
    Plan {
        model: "m".into(),
        parameters: shape.parameters(),
        device: if s.gpu { "cuda" } else { "cpu" },
        world_size: 8,
        zero_stage: s.zero_stage,
        workers: vec![writer, other],
        capacity: Some(Capacity {
            bytes: capacity,
            source: "--device-memory".into(),
        }),
    }
}

#[test]
fn seven_b_in_bf16_needs_about_twenty_bytes_per_parameter_and_does_not_fit_80gb() {
    let shape = Shape::from_json(&json!({"vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}))
    .unwrap();
    let (writer, other) = estimate(&shape, &settings());
    let state: u64 = other
        .terms
        .iter()
        .filter(|t| t.name != "activations")
        .map(|t| t.bytes)
        .sum();
    assert_eq!(state, 20 * shape.parameters());
    // The snapshot lives in host memory on a GPU job: rank 0's device peak is the same.
    assert_eq!(writer.device_bytes(), other.device_bytes());
    let plan = plan_of(&shape, &settings(), 80_000_000_000);
    let refusal = plan.check().unwrap_err();
    assert!(
        refusal.contains("biggest term is optimizer state"),
        "{refusal}"
    );
    assert!(refusal.contains("training.zero_stage: 1"), "{refusal}");
}

/// The README's table: bytes per parameter on each rank of 8 for a 7B model at every ZeRO
/// stage: stage 1 brings it under 80 GB in fp32 and in bf16 (whose fp32 masters are sharded).
#[test]
fn zero_stages_shard_the_moments_across_ranks() {
    let shape = Shape::from_json(&json!({"vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}))
    .unwrap();
    let p = shape.parameters();
    // GPU memory: the checkpoint snapshot (each rank's chunk of the moments) is in host memory.
    let state = |plan: &WorkerPlan| -> u64 {
        plan.terms
            .iter()
            .filter(|t| t.name != "activations" && t.place == Place::Device)
            .map(|t| t.bytes)
            .sum()
    };
    let at = |zero_stage, bf16| {
        let s = Settings {
            zero_stage,
            bf16,
            ..settings()
        };
        (estimate(&shape, &s).1, plan_of(&shape, &s, 80_000_000_000))
    };
    // bf16: masters 4 (or 4/8) + compute copy 2 + gradients 6 + moments 8 (or 8/8).
    assert_eq!(state(&at(0, true).0), 20 * p);
    assert_eq!(state(&at(1, true).0), 9 * p + p / 2);
    assert_eq!(state(&at(2, true).0), 10 * p);
    let (_, bf16_plan) = at(1, true);
    assert!(
        bf16_plan.check().is_ok(),
        "{}",
        bf16_plan.check().unwrap_err()
    );
    // fp32: weights 4 + gradients 4 + moments.
    assert_eq!(state(&at(0, false).0), 16 * p);
    let (one, plan) = at(1, false);
    assert_eq!(state(&one), 9 * p);
    assert!(plan.check().is_ok(), "{}", plan.check().unwrap_err());
    assert!(at(0, false).1.check().is_err());
    // Host memory for checkpoints: rank 0 no longer gathers the moments, only bf16's masters.
    let host = |plan: &WorkerPlan| -> u64 {
        plan.terms
            .iter()
            .filter(|t| t.place == Place::Host)
            .map(|t| t.bytes)
            .sum()
    };
    let fp32 = Settings {
        zero_stage: 1,
        bf16: false,
        ..settings()
    };
    let (writer, other) = estimate(&shape, &fp32);
    assert_eq!((host(&writer), host(&other)), (4 * p + p, p));
    let (writer, _) = estimate(
        &shape,
        &Settings {
            zero_stage: 1,
            ..settings()
        },
    );
    assert_eq!(host(&writer), 8 * p + p);
}

#[test]
fn an_over_large_micro_batch_is_refused_naming_the_activations() {
    let shape = Shape::from_json(&json!({"vocab_size": 259, "hidden_size": 128,
        "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}))
    .unwrap();
    let small = Settings {
        micro_batch: 8,
        seq_len: 160,
        bf16: false,
        activation_checkpointing: false,
        gpu: false,
        packing: false,
        periodic_checkpoints: true,
        zero_stage: 0,
        world_size: 2,
    };
    let fits = plan_of(&shape, &small, 1 << 30);
    assert!(fits.check().is_ok());
    let big = Settings {
        micro_batch: 512,
        ..small.clone()
    };
    let refusal = plan_of(&shape, &big, 1 << 30).check().unwrap_err();
    assert!(refusal.contains("biggest term is activations"), "{refusal}");
    assert!(
        refusal.contains("micro_batch_size 512 x seq_len 160"),
        "{refusal}"
    );
    assert!(refusal.contains("activation_checkpointing"), "{refusal}");
    // Checkpointing keeps only the layer inputs: far less.
    let checkpointed = Settings {
        activation_checkpointing: true,
        ..big
    };
    let (_, with) = estimate(&shape, &checkpointed);
    let (_, without) = estimate(
        &shape,
        &Settings {
            micro_batch: 512,
            ..small
        },
    );
    assert!(with.peak_bytes * 2 < without.peak_bytes);
}
