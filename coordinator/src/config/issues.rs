//! Config problems with their location: serde/YAML errors turned into dotted field paths and
//! "did you mean" hints, and the `file:line:column: field: message` rendering.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a config file, with where it is and what to do about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub line: u32,
    pub column: u32,
    pub field: String,
    pub message: String,
    pub hint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_issues(file, issues))]
    Invalid { file: PathBuf, issues: Vec<Issue> },
}

impl ConfigError {
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { issues, .. } => issues,
        }
    }
}

fn render_issues(file: &Path, issues: &[Issue]) -> String {
    let mut out = String::new();
    for (i, issue) in issues.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}:{}:{}: `{}`: {}",
            file.display(),
            issue.line,
            issue.column,
            issue.field,
            issue.message
        ));
        if let Some(hint) = &issue.hint {
            out.push_str(&format!("\n    help: {hint}"));
        }
    }
    out
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: `{}`: {}",
            self.line, self.column, self.field, self.message
        )
    }
}

/// Turns a YAML/serde error into an [`Issue`] naming the dotted field path.
pub(super) fn yaml_issue(e: &serde_saphyr::Error, text: &str) -> Issue {
    let (line, column) = e
        .location()
        .map(|l| (l.line() as u32, l.column() as u32))
        .unwrap_or((0, 0));
    let rendered = e.without_snippet().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    // serde-saphyr prefixes "error: line L column C: "; the location is reported separately.
    let message = first
        .split_once(&format!("column {column}: "))
        .map(|(_, m)| m)
        .unwrap_or(first)
        .trim_start_matches("error: ");
    // Some messages repeat the location; it is reported once, in front.
    let message = match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => &message[..i],
        _ => message,
    }
    .to_string();
    let mut path = key_path_at(text, line);
    let mut hint = None;
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (unknown, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let candidates: Vec<&str> = expected
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .split(", ")
            .map(|s| s.trim_matches('`'))
            .filter(|s| !s.is_empty())
            .collect();
        hint = Some(match closest(unknown, &candidates) {
            Some(best) => format!(
                "did you mean `{best}`? valid fields here: {}",
                candidates.join(", ")
            ),
            None => format!("valid fields here: {}", candidates.join(", ")),
        });
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let missing = rest.split('`').next().unwrap_or(rest);
        // The location is the mapping that lacks the field; name the field itself.
        path.pop();
        path.push(missing.to_string());
        hint = Some(format!(
            "add `{missing}` to this section (see examples/tiny/cluster.yaml)"
        ));
    } else if message.starts_with("invalid") || message.contains("expected") {
        hint = Some(
            "fix the value's type (see examples/tiny/cluster.yaml for a complete file)".into(),
        );
    }
    Issue {
        line,
        column,
        field: if path.is_empty() {
            "(document)".into()
        } else {
            path.join(".")
        },
        message,
        hint,
    }
}

/// The dotted key path of the block-style mapping entry on `line` (1-based), found by walking
/// up to the nearest less-indented keys. Flow-style YAML yields the enclosing block key.
pub(super) fn key_path_at(text: &str, line: u32) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(idx) = (line as usize).checked_sub(1).filter(|&i| i < lines.len()) else {
        return Vec::new();
    };
    fn key_of(l: &str) -> Option<(usize, String)> {
        let trimmed = l.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return None;
        }
        let indent = l.len() - trimmed.len();
        let entry = trimmed.trim_start_matches("- ");
        let key = entry
            .split_once(':')
            .map(|(k, _)| k.trim().trim_matches(['"', '\'']))?;
        Some((indent, key.to_string()))
    }
    let mut path = Vec::new();
    let mut indent = match key_of(lines[idx]) {
        Some((i, k)) => {
            path.push(k);
            i
        }
        None => lines[idx].len() - lines[idx].trim_start().len() + 1,
    };
    for l in lines[..idx].iter().rev() {
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.insert(0, k);
                indent = i;
                if i == 0 {
                    break;
                }
            }
        }
    }
    path
}

fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
