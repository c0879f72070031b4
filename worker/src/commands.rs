//! `worker generate` and `worker score`: load a Hugging Face model directory (a base model or a
//! ferrotune checkpoint) and run inference on it.

use crate::data::text::read_jsonl_texts;
use crate::infer::{self, Sampling};
use crate::model::io::LoadedModel;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context};
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
    let tokenizer = Tokenizer::from_model_dir(model_dir, &model.config)?;
    Ok((model, tokenizer))
}

fn to_i64(ids: Vec<u32>) -> Vec<i64> {
    ids.into_iter().map(i64::from).collect()
}

/// Prints the completion of `prompt` to stdout.
pub fn generate(
    model_dir: &Path,
    prompt: &str,
    device: Device,
    mut sampling: Sampling,
) -> anyhow::Result<()> {
    let (model, tokenizer) = load(model_dir, device)?;
    let ids = to_i64(
        tokenizer
            .encode_with(prompt, true)
            .map_err(anyhow::Error::msg)
            .context("tokenizing the prompt")?,
    );
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization; give at least one token of text");
    }
    sampling.stop.extend(tokenizer.special.eos.map(i64::from));
    sampling.stop.extend(&model.config.eos_token_ids);
    let out = infer::generate(&model, &ids, &sampling);
    let ids: Vec<u32> = out.iter().map(|&t| t as u32).collect();
    let text = tokenizer.decode(&ids).map_err(anyhow::Error::msg)?;
    println!("{text}");
    Ok(())
}

/// One JSON line per input text: {"index", "loss", "tokens"}.
pub fn score(model_dir: &Path, input: &Path, device: Device) -> anyhow::Result<()> {
    let (model, tokenizer) = load(model_dir, device)?;
    let texts = read_jsonl_texts(input)?;
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
