//! The `data:` section: one dataset (`train:` / `eval:`) or a weighted list (`datasets:`), the
//! sequence options, the chat template and the cache directory.

use super::{defaults, Checks, Spanned};
use ferrotune_data::chat::ChatTemplate;
use ferrotune_data::pack::Overlong;
use ferrotune_data::record::Format;
use ferrotune_data::source::Records;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataSection {
    #[serde(default)]
    train: Option<Spanned<String>>,
    #[serde(default)]
    eval: Option<Spanned<String>>,
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default)]
    datasets: Option<Vec<DatasetSection>>,
    seq_len: Spanned<u32>,
    #[serde(default = "defaults::eval_max_sequences")]
    eval_max_sequences: u32,
    #[serde(default = "defaults::eval_samples")]
    eval_samples: u32,
    #[serde(default)]
    packing: bool,
    #[serde(default)]
    overlong: Option<Spanned<String>>,
    #[serde(default)]
    train_on_inputs: bool,
    #[serde(default)]
    chat_template: Option<Spanned<String>>,
    #[serde(default)]
    chat_template_file: Option<Spanned<String>>,
    #[serde(default)]
    chat_template_kwargs: Option<Spanned<serde_json::Value>>,
    #[serde(default)]
    cache_dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetSection {
    #[serde(default)]
    name: Option<Spanned<String>>,
    path: Spanned<String>,
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default = "defaults::weight")]
    weight: Spanned<f64>,
    #[serde(default)]
    eval: Option<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetConfig {
    pub name: String,
    pub path: PathBuf,
    pub format: Format,
    pub weight: f64,
    pub eval_path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct DataConfig {
    pub datasets: Vec<DatasetConfig>,
    pub seq_len: u32,
    pub eval_max_sequences: u32,
    /// Held-out prompts per prompt-bearing dataset in the eval report.
    pub eval_samples: u32,
    pub packing: bool,
    pub overlong: Overlong,
    pub train_on_inputs: bool,
    /// The template from cluster.yaml (inline or read from its file); None: the model's own.
    pub chat_template: Option<String>,
    /// Extra template variables, as `apply_chat_template(**kwargs)` passes them.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    pub cache_dir: PathBuf,
}

/// The layout of a dataset, from its first non-blank line (Parquet: first row); Err says why
/// the file cannot be read.
fn sniff(path: &Path) -> Result<Option<Format>, String> {
    match Records::first(path) {
        Ok(first) => Ok(first.as_deref().and_then(Format::detect)),
        Err(e) => Err(e.to_string()),
    }
}

impl Checks<'_> {
    /// The `format:` given at `field`, or the one the file at `at` (named `path_field`) shows.
    fn format(
        &mut self,
        given: Option<&Spanned<String>>,
        field: &str,
        path: &Path,
        at: &Spanned<String>,
        path_field: &str,
    ) -> Format {
        match given {
            Some(f) => Format::from_name(&f.value).unwrap_or_else(|| {
                self.push(
                    f,
                    field,
                    format!("unknown format `{}`", f.value),
                    &format!("use one of {}", Format::NAMES.join(", ")),
                );
                Format::Text
            }),
            None if !path.is_file() => Format::Text,
            None => match sniff(path) {
                Ok(Some(format)) => format,
                Ok(None) => {
                    self.push(
                        at,
                        field,
                        format!(
                            "cannot tell the layout of {} from its first line (Parquet: row)",
                            path.display()
                        ),
                        "set `format:` to text, prompt_completion or messages",
                    );
                    Format::Text
                }
                Err(e) => {
                    self.push(at, path_field, e, "check the file, or point to another");
                    Format::Text
                }
            },
        }
    }

    pub(super) fn data(&mut self, d: &DataSection, checkpoint_dir: &Path) -> DataConfig {
        let seq_len = self.positive_u32(&d.seq_len, "data.seq_len");
        let mut datasets = Vec::new();
        match (&d.train, &d.datasets) {
            (Some(train), None) => {
                let path = self.existing(train, "data.train", false);
                let format =
                    self.format(d.format.as_ref(), "data.format", &path, train, "data.train");
                let eval_path = d
                    .eval
                    .as_ref()
                    .map(|e| self.existing(e, "data.eval", false));
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "train".into());
                datasets.push(DatasetConfig {
                    name,
                    path,
                    format,
                    weight: 1.0,
                    eval_path,
                });
            }
            (None, Some(list)) => {
                for (i, ds) in list.iter().enumerate() {
                    let field = |f: &str| format!("data.datasets[{i}].{f}");
                    let path = self.existing(&ds.path, &field("path"), false);
                    let format = self.format(
                        ds.format.as_ref(),
                        &field("format"),
                        &path,
                        &ds.path,
                        &field("path"),
                    );
                    let weight = self.finite_at_least(&ds.weight, &field("weight"), 0.0, true);
                    let eval_path = ds
                        .eval
                        .as_ref()
                        .map(|e| self.existing(e, &field("eval"), false));
                    let name = match &ds.name {
                        Some(n) => {
                            let ok = !n.value.is_empty()
                                && n.value
                                    .chars()
                                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                            if !ok {
                                self.push(n, &field("name"), format!("`{}` is not a usable name", n.value), "use letters, digits, `-`, `_` or `.` (it names cache directories and eval lines)");
                            }
                            n.value.clone()
                        }
                        None => path
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_else(|| format!("dataset{i}")),
                    };
                    if datasets.iter().any(|o: &DatasetConfig| o.name == name) {
                        self.push(
                            &ds.path,
                            &field("name"),
                            format!("a second dataset is named `{name}`"),
                            "give each dataset a distinct `name:`",
                        );
                    }
                    datasets.push(DatasetConfig {
                        name,
                        path,
                        format,
                        weight,
                        eval_path,
                    });
                }
                if list.is_empty() {
                    self.push(
                        &d.seq_len,
                        "data.datasets",
                        "is empty".into(),
                        "list at least one dataset with a `path:`",
                    );
                }
                for (key, value) in [("data.eval", &d.eval), ("data.format", &d.format)] {
                    if let Some(v) = value {
                        self.push(
                            v,
                            key,
                            "belongs to the single-dataset form (`data.train`)".into(),
                            "with `data.datasets`, give each dataset its own `eval:` and `format:`",
                        );
                    }
                }
            }
            (Some(train), Some(_)) => self.push(
                train,
                "data.train",
                "cannot be combined with data.datasets".into(),
                "list the training file as one entry of data.datasets",
            ),
            (None, None) => self.push(
                &d.seq_len,
                "data.datasets",
                "no training data: neither data.train nor data.datasets is set".into(),
                "add `train: path/to/train.jsonl` or a `datasets:` list",
            ),
        }
        let overlong = match &d.overlong {
            None => Overlong::Truncate,
            Some(o) => Overlong::from_name(&o.value).unwrap_or_else(|| {
                self.push(
                    o,
                    "data.overlong",
                    format!("unknown policy `{}`", o.value),
                    "use truncate (keep the start) or drop",
                );
                Overlong::Truncate
            }),
        };
        let chat_template = match (&d.chat_template, &d.chat_template_file) {
            (Some(_), Some(f)) => {
                self.push(
                    f,
                    "data.chat_template_file",
                    "cannot be combined with data.chat_template".into(),
                    "keep one of them",
                );
                None
            }
            (Some(t), None) => Some((t.value.clone(), t, "data.chat_template")),
            (None, Some(f)) => {
                let path = self.existing(f, "data.chat_template_file", false);
                std::fs::read_to_string(&path)
                    .ok()
                    .map(|text| (text, f, "data.chat_template_file"))
            }
            (None, None) => None,
        }
        .map(|(text, at, field)| {
            if let Err(e) = ChatTemplate::new(&text, "", "") {
                self.push(
                    at,
                    field,
                    e,
                    "fix the Jinja template (transformers' chat_template dialect)",
                );
            }
            text
        });
        let chat_template_kwargs = match &d.chat_template_kwargs {
            None => serde_json::Map::new(),
            Some(k) => match &k.value {
                serde_json::Value::Object(map) => {
                    let reserved = ferrotune_data::chat::RESERVED_VARIABLES;
                    if let Some(name) = map.keys().find(|n| reserved.contains(&n.as_str())) {
                        self.push(
                            k,
                            "data.chat_template_kwargs",
                            format!("`{name}` is set by the renderer itself"),
                            "remove it; kwargs add variables such as enable_thinking: false",
                        );
                    }
                    map.clone()
                }
                other => {
                    self.push(
                        k,
                        "data.chat_template_kwargs",
                        format!("expected a mapping of template variables, got {other}"),
                        "write e.g. `chat_template_kwargs: {enable_thinking: false}`",
                    );
                    serde_json::Map::new()
                }
            },
        };
        let cache_dir = match &d.cache_dir {
            Some(c) => self.resolve(&c.value),
            None => checkpoint_dir.join("data-cache"),
        };
        DataConfig {
            datasets,
            seq_len,
            eval_max_sequences: d.eval_max_sequences,
            eval_samples: d.eval_samples,
            packing: d.packing,
            overlong,
            train_on_inputs: d.train_on_inputs,
            chat_template,
            chat_template_kwargs,
            cache_dir,
        }
    }
}
