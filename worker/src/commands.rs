//! `worker generate` and `worker score`: load a Hugging Face model directory (a base model or a
//! ferrotune checkpoint) and run inference on it.

use crate::infer::{self, Sampling};
use crate::model::io::LoadedModel;
use anyhow::{bail, Context};
use ferrotune_data::chat::ChatTemplate;
use ferrotune_data::record::{read_texts, Message, Role};
use ferrotune_data::trainer_state::{TrainerState, STATE_FILE, TRAINING_STATE};
use ferrotune_data::Tokenizer;
use std::io::Write;
use std::path::Path;
use tch::Device;

pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => bail!("--device cuda: no CUDA device is visible to libtorch"),
        other => bail!("--device `{other}`: expected cpu or cuda"),
    }
}

fn load(model_dir: &Path, device: Device) -> anyhow::Result<(LoadedModel, Tokenizer)> {
    let model = LoadedModel::load(model_dir, false, device)?;
    let tokenizer = Tokenizer::from_model_dir(model_dir)?;
    Ok((model, tokenizer))
}

fn to_i64(ids: Vec<u32>) -> Vec<i64> {
    ids.into_iter().map(i64::from).collect()
}

/// How `generate` turns the prompt into tokens.
pub enum Chat {
    /// Plain text, with the tokenizer's special tokens.
    Off,
    /// A user message rendered with the model's chat template and its generation prompt.
    ModelTemplate,
    /// The same with this template text.
    Template(String),
}

/// Prints the completion of `prompt` to stdout.
/// `kwargs`: template variables; None: those the checkpoint `model_dir` was trained with.
pub fn generate(
    model_dir: &Path,
    prompt: &str,
    (chat, kwargs): (Chat, Option<serde_json::Map<String, serde_json::Value>>),
    device: Device,
    mut sampling: Sampling,
) -> anyhow::Result<()> {
    let (model, tokenizer) = load(model_dir, device)?;
    let kwargs = match kwargs {
        Some(k) => k,
        None if model_dir.join(TRAINING_STATE).join(STATE_FILE).is_file() => {
            TrainerState::read(model_dir)?.chat_template_kwargs
        }
        None => serde_json::Map::new(),
    };
    let configured = match &chat {
        Chat::Template(text) => Some(text.as_str()),
        _ => None,
    };
    let encoded = if !matches!(chat, Chat::Off) {
        let template = ChatTemplate::resolve(&tokenizer, configured, &kwargs)
            .map_err(anyhow::Error::msg)?
            .with_context(|| {
                format!(
                    "--chat: {} has no chat_template in tokenizer_config.json; pass --chat-template FILE",
                    model_dir.display()
                )
            })?;
        let user = [Message::new(Role::User, prompt)];
        let text = template.render(&user, true).map_err(anyhow::Error::msg)?;
        tokenizer.encode(&text)
    } else {
        tokenizer.encode_with(prompt, true)
    };
    let ids = to_i64(
        encoded
            .map_err(anyhow::Error::msg)
            .context("tokenizing the prompt")?,
    );
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization; give at least one token of text");
    }
    tracing::info!("prompt of {} tokens", ids.len());
    sampling
        .stop
        .extend(infer::stop_ids(&tokenizer, &model.config));
    let out = infer::generate(&model, &ids, &sampling);
    let ids: Vec<u32> = out.iter().map(|&t| t as u32).collect();
    let text = tokenizer.decode(&ids).map_err(anyhow::Error::msg)?;
    println!("{text}");
    Ok(())
}

/// One JSON line per input text: {"index", "loss", "tokens"}.
pub fn score(model_dir: &Path, input: &Path, device: Device) -> anyhow::Result<()> {
    let (model, tokenizer) = load(model_dir, device)?;
    let texts = read_texts(input)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (index, text) in texts.iter().enumerate() {
        let ids = to_i64(
            tokenizer
                .encode_with(text, true)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: text {index}", input.display()))?,
        );
        let line = match infer::score(&model, &ids) {
            Some((loss, tokens)) => {
                serde_json::json!({"index": index, "loss": loss, "tokens": tokens})
            }
            None => serde_json::json!({"index": index, "loss": null, "tokens": 0}),
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}
