//! Model weights in and out, in Hugging Face layout (config.json + model.safetensors).

use super::{Llama, LlamaConfig, ModelError};
use std::path::Path;
use tch::{nn, Device, Tensor};

/// A model and the variable store that owns its parameters.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub model: Llama,
    pub config: LlamaConfig,
}

impl LoadedModel {
    /// Builds the model from `dir/config.json`, then loads `dir/model.safetensors` unless
    /// `random_init` (seeded by the caller through `tch::manual_seed`).
    pub fn load(dir: &Path, random_init: bool, device: Device) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let mut vs = nn::VarStore::new(device);
        let model = Llama::new(&vs.root(), &config);
        if !random_init {
            let weights = dir.join("model.safetensors");
            tch::no_grad(|| vs.load(&weights)).map_err(|source| ModelError::Weights {
                path: weights.display().to_string(),
                source,
            })?;
        }
        Ok(LoadedModel { vs, model, config })
    }

    /// Parameters sorted by name: every rank walks them in the same order, which the gradient
    /// buckets and the optimizer state depend on.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// Writes the weights as one safetensors file with the Hugging Face names.
    pub fn save_weights(&self, path: &Path) -> Result<(), ModelError> {
        let params = self.named_parameters();
        let named: Vec<(&str, Tensor)> = params
            .iter()
            .map(|(n, t)| (n.as_str(), t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&named, path).map_err(|source| ModelError::Weights {
            path: path.display().to_string(),
            source,
        })
    }
}
