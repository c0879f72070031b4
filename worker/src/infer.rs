//! Inference for evaluation: text generation with a KV cache (greedy, or temperature with
//! nucleus/top-p sampling) and per-sequence scoring. `worker generate` and `worker score` are
//! thin wrappers; eval reports and the parity checks use the same functions.

use crate::model::io::LoadedModel;
use crate::model::{KvCache, Llama};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only from the smallest set of tokens whose probability reaches top_p.
    pub top_p: f64,
    pub seed: u64,
    /// Stop after generating one of these ids (the model's end-of-sequence tokens).
    pub stop: Vec<i64>,
}

/// The ids generation stops at: the tokenizer's end-of-sequence token and the model's
/// `eos_token_id`s.
pub fn stop_ids(
    tokenizer: &ferrotune_data::Tokenizer,
    config: &crate::model::ModelConfig,
) -> Vec<i64> {
    let mut ids: Vec<i64> = tokenizer.special.eos.map(i64::from).into_iter().collect();
    ids.extend(&config.eos_token_ids);
    ids
}

/// Picks the next token from one position's logits.
fn choose(logits: &Tensor, sampling: &Sampling, rng: &mut ChaCha8Rng) -> i64 {
    if sampling.temperature <= 0.0 {
        return logits.argmax(-1, false).int64_value(&[]);
    }
    let probs = (logits.to_kind(Kind::Double) / sampling.temperature).softmax(-1, Kind::Double);
    let (sorted, order) = probs.sort(-1, true);
    let sorted = Vec::<f64>::try_from(&sorted).expect("a 1-D double tensor");
    let order = Vec::<i64>::try_from(&order).expect("a 1-D int64 tensor");
    // Keep tokens while the mass before them is below top_p: the first token always stays.
    let mut kept = 0;
    let mut mass = 0.0;
    while kept < sorted.len() && (kept == 0 || mass < sampling.top_p) {
        mass += sorted[kept];
        kept += 1;
    }
    let mut u = rng.random::<f64>() * mass;
    for (p, &token) in sorted[..kept].iter().zip(&order) {
        if u < *p {
            return token;
        }
        u -= p;
    }
    order[kept - 1]
}

/// Continues `prompt` (token ids); returns the generated ids, ending with a stop token if one
/// was produced.
pub fn generate(model: &LoadedModel, prompt: &[i64], sampling: &Sampling) -> Vec<i64> {
    generate_with(&model.model, model.vs.device(), prompt, sampling)
}

/// [`generate`] on a model that is not a loaded directory (the trainer's, or its compute copy).
pub fn generate_with(
    model: &Llama,
    device: tch::Device,
    prompt: &[i64],
    sampling: &Sampling,
) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::default();
    let mut out = Vec::with_capacity(sampling.max_new_tokens);
    tch::no_grad(|| {
        let mut input = Tensor::from_slice(prompt).unsqueeze(0).to_device(device);
        for _ in 0..sampling.max_new_tokens {
            let logits = model.forward_cached(&input, &mut cache);
            let last = logits.get(0).get(-1);
            let token = choose(&last, sampling, &mut rng);
            out.push(token);
            if sampling.stop.contains(&token) {
                break;
            }
            input = Tensor::from_slice(&[token]).unsqueeze(0).to_device(device);
        }
    });
    out
}

/// Mean next-token cross-entropy over a sequence and the number of predicted tokens (n - 1),
/// as transformers' `model(ids, labels=ids).loss`. None for sequences of fewer than 2 tokens.
pub fn score(model: &LoadedModel, ids: &[i64]) -> Option<(f64, usize)> {
    if ids.len() < 2 {
        return None;
    }
    let n = ids.len() as i64;
    let all = Tensor::from_slice(ids)
        .unsqueeze(0)
        .to_device(model.vs.device());
    let (loss, count) = tch::no_grad(|| {
        model
            .model
            .loss_sum(&all.narrow(1, 0, n - 1), &all.narrow(1, 1, n - 1))
    });
    Some((loss.double_value(&[]) / count as f64, count as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use tch::{nn, Device};

    fn model(extra: serde_json::Value) -> LoadedModel {
        let mut json = serde_json::json!({
            "model_type": "llama", "vocab_size": 31, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "initializer_range": 0.5
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let config = ModelConfig::from_json(json, "test").unwrap();
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = crate::model::Llama::new(&vs.root(), &config);
        LoadedModel { vs, model, config }
    }

    /// Greedy decoding by recomputing the whole sequence each step: the obvious version.
    fn greedy_without_cache(m: &LoadedModel, prompt: &[i64], n: usize) -> Vec<i64> {
        let mut seq = prompt.to_vec();
        tch::no_grad(|| {
            for _ in 0..n {
                let logits = m.model.forward(&Tensor::from_slice(&seq).unsqueeze(0));
                seq.push(logits.get(0).get(-1).argmax(-1, false).int64_value(&[]));
            }
        });
        seq[prompt.len()..].to_vec()
    }

    #[test]
    fn cached_greedy_decoding_equals_full_recomputation() {
        // Plain causal attention, and a sliding window shorter than the generated sequence.
        for extra in [
            serde_json::json!({}),
            serde_json::json!({"model_type": "mistral", "sliding_window": 5}),
        ] {
            let m = model(extra.clone());
            let prompt = [1, 7, 3, 9];
            let sampling = Sampling {
                max_new_tokens: 12,
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                stop: vec![],
            };
            assert_eq!(
                generate(&m, &prompt, &sampling),
                greedy_without_cache(&m, &prompt, 12),
                "{extra}"
            );
        }
    }

    #[test]
    fn sampling_is_seeded_and_top_p_restricts_the_choice() {
        let m = model(serde_json::json!({}));
        let sampling = |seed, top_p| Sampling {
            max_new_tokens: 20,
            temperature: 1.0,
            top_p,
            seed,
            stop: vec![],
        };
        let a = generate(&m, &[1, 2], &sampling(7, 1.0));
        assert_eq!(a, generate(&m, &[1, 2], &sampling(7, 1.0)));
        assert_ne!(a, generate(&m, &[1, 2], &sampling(8, 1.0)));
        // A vanishing top_p keeps only the most likely token: greedy decoding.
        assert_eq!(
            generate(&m, &[1, 2], &sampling(9, 1e-9)),
            greedy_without_cache(&m, &[1, 2], 20)
        );
    }
}
