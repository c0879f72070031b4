//! The eval report's samples: the first `data.eval_samples` held-out prompts of every dataset
//! that has prompts (prompt/completion, messages), answered greedily by the model before and
//! after fine-tuning. Prompts are shared out over the ranks (prompt i on rank i mod world), each
//! rank sends its answers to the coordinator, which writes `report.md`.
//!
//! A prompt is encoded exactly as training encodes the same record up to the answer:
//! `tokenizer(prompt)` for prompt/completion, the chat template with its generation prompt over
//! the messages before the last assistant turn for conversations.

use crate::infer::{generate_with, Sampling};
use crate::model::Llama;
use crate::spec::TrainSpec;
use ferrotune_data::chat::ChatTemplate;
use ferrotune_data::record::{parse, Format, Message, Record, Role};
use ferrotune_data::source::Records;
use ferrotune_data::{DataError, Tokenizer};
use tch::Device;

/// Longest answer generated for the report.
const MAX_ANSWER_TOKENS: usize = 384;

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub dataset: String,
    pub index: u32,
    /// What a reader sees: the prompt, or the conversation's last user message.
    pub shown: String,
    pub ids: Vec<i64>,
    pub reference: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub dataset: String,
    pub index: u32,
    pub prompt: String,
    pub answer: String,
    pub reference: String,
}

/// The prompt of one held-out record, or None for a record without one (text, or a
/// conversation that does not end with an assistant turn).
fn prompt_of(
    record: Record,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Option<(String, Vec<u32>, String)>, String> {
    match record {
        Record::PromptCompletion { prompt, completion } => {
            let ids = tokenizer.encode_with(&prompt, true)?;
            Ok(Some((prompt, ids, completion)))
        }
        Record::Messages(messages) => {
            let Some(last) = messages.iter().rposition(|m| m.role == Role::Assistant) else {
                return Ok(None);
            };
            let Some(template) = template else {
                return Ok(None);
            };
            let context: &[Message] = &messages[..last];
            let shown = context
                .iter()
                .rfind(|m| m.role == Role::User)
                .map_or_else(String::new, |m| m.content.clone());
            let text = template.render(context, true)?;
            Ok(Some((
                shown,
                tokenizer.encode(&text)?,
                messages[last].content.clone(),
            )))
        }
        Record::Text(_) => Ok(None),
    }
}

/// The report's prompts, dataset by dataset in config order.
pub fn prompts(spec: &TrainSpec, tokenizer: &Tokenizer) -> Result<Vec<Prompt>, DataError> {
    let mut out = Vec::new();
    if spec.eval_samples == 0 {
        return Ok(out);
    }
    let template = ChatTemplate::resolve(
        tokenizer,
        spec.chat_template.as_deref(),
        &spec.chat_template_kwargs,
    )
    .map_err(DataError::Rejected)?;
    for d in &spec.datasets {
        let (Some(path), Format::PromptCompletion | Format::Messages) = (&d.eval_path, d.format)
        else {
            continue;
        };
        let mut records = Records::open(path)?;
        let mut index = 0;
        while (index as usize) < spec.eval_samples {
            let Some(bytes) = records.next_record()? else {
                break;
            };
            let line = String::from_utf8_lossy(&bytes);
            if line.trim().is_empty() {
                continue;
            }
            // The data was validated before the job started; a line that fails now is skipped.
            let Ok(record) = parse(&line, d.format) else {
                continue;
            };
            let Ok(Some((shown, ids, reference))) = prompt_of(record, tokenizer, template.as_ref())
            else {
                continue;
            };
            if ids.is_empty() || ids.len() >= spec.seq_len {
                continue;
            }
            out.push(Prompt {
                dataset: d.name.clone(),
                index,
                shown,
                ids: ids.into_iter().map(i64::from).collect(),
                reference,
            });
            index += 1;
        }
    }
    Ok(out)
}

/// This rank's share of the prompts, answered greedily by `net`.
pub fn answer(
    net: &Llama,
    device: Device,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    (rank, world): (usize, usize),
    stop: &[i64],
    seq_len: usize,
) -> Vec<Sample> {
    prompts
        .iter()
        .enumerate()
        .filter(|(i, _)| i % world.max(1) == rank)
        .map(|(_, p)| {
            let sampling = Sampling {
                max_new_tokens: MAX_ANSWER_TOKENS.min(seq_len.saturating_sub(p.ids.len()).max(1)),
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
                stop: stop.to_vec(),
            };
            let ids: Vec<u32> = generate_with(net, device, &p.ids, &sampling)
                .into_iter()
                .map(|t| t as u32)
                .collect();
            Sample {
                dataset: p.dataset.clone(),
                index: p.index,
                prompt: p.shown.clone(),
                answer: tokenizer.decode(&ids).unwrap_or_default(),
                reference: p.reference.clone(),
            }
        })
        .collect()
}
