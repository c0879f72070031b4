//! Inference for evaluation: text generation with a KV cache (greedy, or temperature with
//! nucleus/top-p sampling) and per-sequence scoring. `worker generate` and `worker score` are
//! thin wrappers; eval reports and the parity checks use the same functions.

use crate::model::io::LoadedModel;
use crate::model::KvCache;
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
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::default();
    let mut out = Vec::with_capacity(sampling.max_new_tokens);
    tch::no_grad(|| {
        let mut input = Tensor::from_slice(prompt)
            .unsqueeze(0)
            .to_device(model.vs.device());
        for _ in 0..sampling.max_new_tokens {
            let logits = model.model.forward_cached(&input, &mut cache);
            let last = logits.get(0).get(-1);
            let token = choose(&last, sampling, &mut rng);
            out.push(token);
            if sampling.stop.contains(&token) {
                break;
            }
            input = Tensor::from_slice(&[token])
                .unsqueeze(0)
                .to_device(model.vs.device());
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
