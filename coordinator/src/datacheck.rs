//! Dataset checks before any GPU hour is spent: every line of every dataset is parsed, checked,
//! tokenized and packed, and a summary is printed. `validate` only reads; `launch` builds the
//! tokenized caches in the same pass (a dataset with errors is never cached), so the workers
//! find them ready and only memory-map them.

use crate::config::JobConfig;
use ferrotune_data::chat::ChatTemplate;
use ferrotune_data::pack::{NullSink, PackOptions};
use ferrotune_data::prepare::{cached, prepare, Prepared, Recipe, Report};
use ferrotune_data::record::Format;
use ferrotune_data::{DataError, Tokenizer};

#[derive(Debug, Default)]
pub struct Summary {
    pub reports: Vec<Report>,
    pub errors: u64,
    pub warnings: u64,
    /// Problems that are not about one line (a missing chat template).
    pub general: Vec<String>,
    /// With `build`: each dataset's training cache directory name, `<name>-train-<key>`.
    pub train_caches: Vec<String>,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.general.is_empty()
    }
}

/// Checks every dataset of the job; with `build`, also writes the caches of valid ones.
pub fn run(config: &JobConfig, build: bool) -> Result<Summary, DataError> {
    let tokenizer = Tokenizer::from_model_dir(&config.model_path)?;
    let template = ChatTemplate::resolve(
        &tokenizer,
        config.data.chat_template.as_deref(),
        &config.data.chat_template_kwargs,
    )
    .map_err(|e| DataError::Rejected(format!("chat template: {e}")))?;
    let mut summary = Summary::default();
    let d = &config.data;
    if template.is_none() {
        for ds in d.datasets.iter().filter(|ds| ds.format == Format::Messages) {
            summary.general.push(format!(
                "dataset {} ({}) is in the messages layout, but {} has no chat_template in tokenizer_config.json; set data.chat_template or data.chat_template_file in {}",
                ds.name,
                ds.path.display(),
                config.model_path.display(),
                config.source.display()
            ));
        }
        if !summary.ok() {
            return Ok(summary);
        }
    }
    for ds in &d.datasets {
        let splits =
            std::iter::once(("train", &ds.path)).chain(ds.eval_path.iter().map(|p| ("eval", p)));
        for (split, path) in splits {
            let recipe = Recipe {
                data: path,
                format: ds.format,
                tokenizer_dir: &config.model_path,
                tokenizer: &tokenizer,
                template: template.as_ref(),
                train_on_inputs: d.train_on_inputs,
                pack: PackOptions {
                    seq_len: d.seq_len as usize,
                    packing: d.packing,
                    overlong: d.overlong,
                },
            };
            let name = format!("{}-{split}", ds.name);
            let report = if build {
                match cached(&name, &recipe, &d.cache_dir)? {
                    Prepared::Ready { report, cache, .. } => {
                        if split == "train" {
                            summary.train_caches.push(cache.name());
                        }
                        *report
                    }
                    Prepared::Rejected(report) => *report,
                }
            } else {
                prepare(&name, &recipe, &mut NullSink)?
            };
            summary.errors += report.errors;
            summary.warnings += report.warnings;
            summary.reports.push(report);
        }
    }
    Ok(summary)
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for g in &self.general {
            writeln!(f, "error: {g}")?;
        }
        for r in &self.reports {
            writeln!(f, "{r}")?;
        }
        write!(
            f,
            "data: {} datasets checked, {} errors, {} warnings",
            self.reports.len(),
            self.errors + self.general.len() as u64,
            self.warnings
        )
    }
}
