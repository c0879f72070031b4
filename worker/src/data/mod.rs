//! From the data crate's cached sequences to tensors: input ids, labels (the ignore index where
//! a token is not learned or is padding), and for packed rows each token's position within its
//! sample and the sample it belongs to.

use crate::model::llama::IGNORE_INDEX;
use crate::model::Packing;
use ferrotune_data::cache::{SampleView, TokenCache};
use tch::{Device, Tensor};

pub use ferrotune_data::DataError;

pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// None when every row holds one sample (plain causal attention is then exact).
    pub packing: Option<Packing>,
    /// Positions with a label.
    pub label_count: i64,
    /// Positions holding a token rather than padding.
    pub input_count: i64,
}

/// A batch of `rows` (each the samples of one sequence) padded to `seq_len`.
pub fn batch(rows: &[Vec<SampleView<'_>>], seq_len: usize, pad_id: u32, device: Device) -> Batch {
    let n = rows.len() * seq_len;
    let mut ids = vec![i64::from(pad_id); n];
    let mut labels = vec![IGNORE_INDEX; n];
    let mut positions = vec![0i64; n];
    // Padding gets segment -1: it attends only to padding, never to a sample.
    let mut segments = vec![-1i64; n];
    let mut packed = false;
    let (mut label_count, mut input_count) = (0, 0);
    for (r, samples) in rows.iter().enumerate() {
        packed |= samples.len() > 1;
        let mut at = r * seq_len;
        for (segment, (tokens, targets)) in samples.iter().enumerate() {
            let inputs = tokens.len() - 1;
            assert!(
                at + inputs <= (r + 1) * seq_len,
                "a cached sequence exceeds seq_len"
            );
            for i in 0..inputs {
                ids[at + i] = i64::from(tokens[i]);
                if targets[i + 1] != 0 {
                    labels[at + i] = i64::from(tokens[i + 1]);
                    label_count += 1;
                }
                positions[at + i] = i as i64;
                segments[at + i] = segment as i64;
            }
            at += inputs;
            input_count += inputs as i64;
        }
    }
    let shape = [rows.len() as i64, seq_len as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    Batch {
        input_ids: tensor(&ids),
        labels: tensor(&labels),
        packing: packed.then(|| Packing {
            positions: tensor(&positions),
            segments: tensor(&segments),
        }),
        label_count,
        input_count,
    }
}

/// The rows of the given sequence indices of a cache.
pub fn rows<'a>(
    cache: &'a TokenCache,
    indices: impl IntoIterator<Item = usize>,
) -> Vec<Vec<SampleView<'a>>> {
    indices.into_iter().map(|i| cache.sequence(i)).collect()
}

/// One dataset of the job, tokenized: its training sequences and optional held-out ones.
pub struct Task {
    pub name: String,
    pub weight: f64,
    pub train: TokenCache,
    pub eval: Option<TokenCache>,
}

/// Opens (or, if the coordinator has not, builds) the cache of every dataset of the job.
pub fn load_tasks(
    spec: &crate::spec::TrainSpec,
    tokenizer: &ferrotune_data::Tokenizer,
) -> Result<Vec<Task>, DataError> {
    use ferrotune_data::chat::ChatTemplate;
    use ferrotune_data::pack::PackOptions;
    use ferrotune_data::prepare::{cached, Prepared, Recipe};
    let template = ChatTemplate::resolve(
        tokenizer,
        spec.chat_template.as_deref(),
        &spec.chat_template_kwargs,
    )
    .map_err(DataError::Rejected)?;
    let open = |name: String, path: &std::path::Path, format| -> Result<TokenCache, DataError> {
        let recipe = Recipe {
            data: path,
            format,
            tokenizer_dir: &spec.model_path,
            tokenizer,
            template: template.as_ref(),
            train_on_inputs: spec.train_on_inputs,
            pack: PackOptions {
                seq_len: spec.seq_len,
                packing: spec.packing,
                overlong: spec.overlong,
            },
        };
        match cached(&name, &recipe, &spec.cache_dir)? {
            Prepared::Ready { cache, .. } => Ok(cache),
            Prepared::Rejected(report) => Err(DataError::Rejected(report.to_string())),
        }
    };
    spec.datasets
        .iter()
        .map(|d| {
            Ok(Task {
                name: d.name.clone(),
                weight: d.weight,
                train: open(format!("{}-train", d.name), &d.path, d.format)?,
                eval: match &d.eval_path {
                    Some(p) => Some(open(format!("{}-eval", d.name), p, d.format)?),
                    None => None,
                },
            })
        })
        .collect()
}
