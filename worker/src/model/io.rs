//! Hugging Face checkpoints in and out: config.json + model.safetensors, or sharded
//! model-0000X-of-0000N.safetensors with model.safetensors.index.json; float32, bfloat16 or
//! float16 on disk, float32 parameters in memory.
//!
//! Memory: a shard is memory-mapped and copied tensor by tensor into the parameters; a shard is
//! written from its tensors converted one shard at a time. Neither ever holds more than one
//! extra copy of the largest shard.

use super::{DType, Llama, ModelConfig, ModelError};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Tokenizer and generation files copied from the base model into every checkpoint.
pub const PASSTHROUGH: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
];

/// How a checkpoint's weights are written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaveOptions {
    pub dtype: DType,
    pub max_shard_bytes: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// A model and the variable store that owns its parameters.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub model: Llama,
    pub config: ModelConfig,
}

fn weights_err(path: &Path, message: String) -> ModelError {
    ModelError::Weights {
        path: path.display().to_string(),
        message,
    }
}

/// The weight files of a checkpoint directory, in order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Read {
            path: index.display().to_string(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.display().to_string(),
                source,
            })?;
        let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(ModelError::Config {
                path: index.display().to_string(),
                field: "weight_map".into(),
                message: "missing or not an object of tensor name -> shard file".into(),
            });
        };
        let mut shards = BTreeMap::new();
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(ModelError::Config {
                    path: index.display().to_string(),
                    field: format!("weight_map.{tensor}"),
                    message: format!("expected a file name, found {file}"),
                });
            };
            shards.entry(file.to_string()).or_insert(tensor.clone());
        }
        let mut files = Vec::new();
        for (file, tensor) in shards {
            let path = dir.join(&file);
            if !path.is_file() {
                return Err(weights_err(
                    &index,
                    format!(
                        "shard `{file}` (holding `{tensor}`, among others) does not exist in \
                         {}; the checkpoint is incomplete: copy the missing shard",
                        dir.display()
                    ),
                ));
            }
            files.push(path);
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(weights_err(
        dir,
        format!("no {SINGLE_FILE} or {INDEX_FILE}: not a Hugging Face safetensors checkpoint"),
    ))
}

/// A tensor over `data` inside a memory-mapped file, without copying it, when the bytes are
/// aligned for the element type (safetensors writers align them); otherwise a copy.
fn mapped_tensor(data: &[u8], shape: &[i64], dtype: DType) -> Result<Tensor, tch::TchError> {
    let size = dtype.size();
    if data.len() != shape.iter().product::<i64>() as usize * size {
        return Err(tch::TchError::Shape(format!(
            "{} bytes for shape {shape:?}",
            data.len()
        )));
    }
    if !(data.as_ptr() as usize).is_multiple_of(size) {
        return Tensor::f_from_data_size(data, shape, dtype.kind());
    }
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `data` holds exactly numel × element-size bytes (checked above), aligned for the
    // element type; the caller reads the tensor (copy_ into a parameter) and drops it before
    // the map that backs `data` is unmapped, and nothing writes through it.
    unsafe { Tensor::f_from_blob(data.as_ptr(), shape, &strides, dtype.kind(), Device::Cpu) }
}

/// Calls `f` with every tensor of the safetensors file `path`, mapped rather than read (a
/// reader that needs only part of each, such as one rank's chunk of an optimizer moment, never
/// copies the rest); the tensors must not outlive `f`.
pub(crate) fn with_mapped_tensors<R>(
    path: &Path,
    f: impl FnOnce(HashMap<String, Tensor>) -> R,
) -> Result<R, ModelError> {
    // By this function's contract `f` copies out of the tensors and returns none of them (its
    // callers return a Result of plain data), so none outlives the map.
    with_safetensors(path, |st| {
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
                weights_err(
                    path,
                    format!("tensor `{name}` is stored as {:?}", view.dtype()),
                )
            })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = mapped_tensor(view.data(), &shape, dtype)
                .map_err(|e| weights_err(path, format!("tensor `{name}`: {e}")))?;
            tensors.insert(name.to_string(), tensor);
        }
        Ok(f(tensors))
    })
}

/// Calls `f` with the safetensors file `path`, memory-mapped and parsed; the map ends when `f`
/// returns.
fn with_safetensors<R>(
    path: &Path,
    f: impl FnOnce(&safetensors::SafeTensors) -> Result<R, ModelError>,
) -> Result<R, ModelError> {
    let handle = std::fs::File::open(path).map_err(|source| ModelError::Read {
        path: path.display().to_string(),
        source,
    })?;
    // SAFETY: the map is read-only and lives only inside this call; a checkpoint being
    // rewritten underneath a reader is outside the contract (commits are by rename into new
    // directories).
    let mmap = unsafe { memmap2::Mmap::map(&handle) }.map_err(|source| ModelError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        weights_err(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    f(&st)
}

/// Names that checkpoints carry but the model recomputes or shares: skipped on load.
fn ignorable(name: &str, config: &ModelConfig) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
        || (config.tie_word_embeddings && name == "lm_head.weight")
}

impl LoadedModel {
    /// Builds the model from `dir/config.json`, then loads its safetensors weights unless
    /// `random_init` (seeded by the caller through `tch::manual_seed`).
    pub fn load(dir: &Path, random_init: bool, device: Device) -> Result<Self, ModelError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let vs = nn::VarStore::new(device);
        // Weights that a checkpoint will overwrite are created as zeros, not drawn.
        let model = if random_init {
            Llama::new(&vs.root(), &config)
        } else {
            let zeros = ModelConfig {
                initializer_range: 0.0,
                ..config.clone()
            };
            Llama::new(&vs.root(), &zeros)
        };
        let loaded = LoadedModel { vs, model, config };
        if !random_init {
            tch::no_grad(|| loaded.load_weights(&weight_files(dir)?, dir))?;
        }
        Ok(loaded)
    }

    /// Overwrites every parameter from one safetensors `file` with the same names (a resumed
    /// checkpoint's fp32 master weights), through the same checks and memory-mapped reads.
    pub fn overwrite_from(&self, file: &Path) -> Result<(), ModelError> {
        tch::no_grad(|| self.load_weights(&[file.to_path_buf()], file))
    }

    /// Reads `files` (together: every parameter exactly once) into the parameters; `whole`
    /// names the set in messages about missing parameters.
    fn load_weights(&self, files: &[PathBuf], whole: &Path) -> Result<(), ModelError> {
        let vars = self.vs.variables();
        let mut seen = BTreeSet::new();
        for file in files {
            with_safetensors(file, |st| {
                // In name order, so the first error reported is the same on every run.
                let mut tensors: Vec<_> = st.iter().collect();
                tensors.sort_by(|a, b| a.0.cmp(b.0));
                for (name, view) in tensors {
                    if ignorable(name, &self.config) {
                        continue;
                    }
                    let Some(var) = vars.get(name) else {
                        return Err(weights_err(
                            file,
                            format!(
                                "unexpected tensor `{name}`: a {} model with this config.json has \
                                 no such parameter",
                                self.config.family.model_type()
                            ),
                        ));
                    };
                    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    if shape != var.size() {
                        return Err(weights_err(
                            file,
                            format!(
                                "tensor `{name}` has shape {shape:?}, but config.json implies {:?}",
                                var.size()
                            ),
                        ));
                    }
                    let Some(dtype) = DType::from_safetensors(view.dtype()) else {
                        return Err(weights_err(
                            file,
                            format!(
                                "tensor `{name}` is stored as {:?}; supported: F32, BF16, F16",
                                view.dtype()
                            ),
                        ));
                    };
                    let tensor = mapped_tensor(view.data(), &shape, dtype)
                        .map_err(|e| weights_err(file, format!("tensor `{name}`: {e}")))?;
                    // copy_ converts dtype and device on the way, reading straight from the map.
                    let mut target = var.shallow_clone();
                    target
                        .f_copy_(&tensor)
                        .map_err(|e| weights_err(file, format!("tensor `{name}`: {e}")))?;
                    seen.insert(name.to_string());
                }
                Ok(())
            })?;
        }
        let missing: Vec<&String> = vars.keys().filter(|n| !seen.contains(*n)).collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
            return Err(weights_err(
                whole,
                format!(
                    "{} parameter(s) missing from the weight files, e.g. {}; the checkpoint does \
                     not match its config.json",
                    missing.len(),
                    shown.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Parameters sorted by name: every rank walks them in the same order, which the gradient
    /// buckets and the optimizer state depend on.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// The live parameters (shared, not copied) as files to write.
    fn files(&self) -> ModelFiles {
        ModelFiles {
            config: self.config.clone(),
            params: self.named_parameters(),
        }
    }

    /// Writes a complete Hugging Face checkpoint into `dir`: see [`ModelFiles::save_pretrained`].
    pub fn save_pretrained(
        &self,
        dir: &Path,
        source_dir: &Path,
        options: &SaveOptions,
    ) -> Result<Vec<PathBuf>, ModelError> {
        self.files().save_pretrained(dir, source_dir, options)
    }

    /// Writes the weights with their Hugging Face names; returns the files written.
    pub fn save_weights(
        &self,
        dir: &Path,
        options: &SaveOptions,
    ) -> Result<Vec<PathBuf>, ModelError> {
        self.files().save_weights(dir, options)
    }
}

/// A model's config and named parameters (sorted by name) as a checkpoint writes them: the live
/// model's, or a snapshot that a background writer owns.
pub struct ModelFiles {
    pub config: ModelConfig,
    pub params: Vec<(String, Tensor)>,
}

impl ModelFiles {
    /// Writes a complete Hugging Face checkpoint into `dir`: config.json (dtype updated), the
    /// weights (one file, or shards plus an index), and the tokenizer and generation files
    /// found in `source_dir`.
    pub fn save_pretrained(
        &self,
        dir: &Path,
        source_dir: &Path,
        options: &SaveOptions,
    ) -> Result<Vec<PathBuf>, ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| write_err(dir, source))?;
        let mut written = self.save_weights(dir, options)?;
        let config_path = dir.join("config.json");
        let json = serde_json::to_vec_pretty(&self.config.to_json_with_dtype(options.dtype))
            .expect("a JSON value serialises");
        std::fs::write(&config_path, json).map_err(|source| write_err(&config_path, source))?;
        written.push(config_path);
        for name in PASSTHROUGH {
            let src = source_dir.join(name);
            if src.is_file() {
                let dst = dir.join(name);
                std::fs::copy(&src, &dst).map_err(|source| ModelError::Read {
                    path: src.display().to_string(),
                    source,
                })?;
                written.push(dst);
            }
        }
        Ok(written)
    }

    /// Writes the weights with their Hugging Face names; returns the files written.
    pub fn save_weights(
        &self,
        dir: &Path,
        options: &SaveOptions,
    ) -> Result<Vec<PathBuf>, ModelError> {
        let params = &self.params;
        let shards = plan_shards(
            params
                .iter()
                .map(|(_, t)| t.numel() as u64 * options.dtype.size() as u64),
            options.max_shard_bytes,
        );
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut files = Vec::new();
        let mut total = 0u64;
        for (i, shard) in shards.iter().enumerate() {
            let file = if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            };
            let tensors: Vec<(String, CpuTensor)> = shard
                .iter()
                .map(|&j| {
                    let (name, t) = &params[j];
                    weight_map.insert(name.clone(), file.clone().into());
                    (name.clone(), CpuTensor::new(t, options.dtype))
                })
                .collect();
            total += tensors.iter().map(|(_, t)| t.bytes as u64).sum::<u64>();
            let path = dir.join(&file);
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            safetensors::serialize_to_file(tensors, Some(metadata), &path)
                .map_err(|e| weights_err(&path, format!("writing: {e}")))?;
            files.push(path);
        }
        if n > 1 {
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            let path = dir.join(INDEX_FILE);
            std::fs::write(
                &path,
                serde_json::to_vec_pretty(&index).expect("JSON serialises"),
            )
            .map_err(|source| write_err(&path, source))?;
            files.push(path);
        }
        Ok(files)
    }
}

fn write_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Groups tensors (by size in bytes, in order) into shards of at most `max_bytes`, as
/// transformers does: a tensor larger than the limit gets a shard of its own.
pub fn plan_shards(sizes: impl IntoIterator<Item = u64>, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, size) in sizes.into_iter().enumerate() {
        let last = shards.last_mut().expect("never empty");
        if !last.is_empty() && current + size > max_bytes {
            shards.push(vec![i]);
            current = size;
        } else {
            last.push(i);
            current += size;
        }
    }
    shards
}

/// A contiguous CPU copy of a parameter in the on-disk dtype, viewed as bytes for safetensors.
struct CpuTensor {
    tensor: Tensor,
    dtype: DType,
    shape: Vec<usize>,
    bytes: usize,
}

impl CpuTensor {
    fn new(t: &Tensor, dtype: DType) -> Self {
        let tensor = t
            .detach()
            .to_device(Device::Cpu)
            .to_kind(dtype.kind())
            .contiguous();
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        let bytes = tensor.numel() * dtype.size();
        CpuTensor {
            tensor,
            dtype,
            shape,
            bytes,
        }
    }
}

impl safetensors::View for CpuTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if self.bytes == 0 {
            return Cow::Borrowed(&[]);
        }
        // SAFETY: `tensor` is a contiguous CPU tensor of `bytes` bytes of `dtype` owned by self;
        // the slice borrows self, so the storage outlives it and nothing writes to it meanwhile.
        let slice =
            unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.bytes) };
        Cow::Borrowed(slice)
    }

    fn data_len(&self) -> usize {
        self.bytes
    }
}
