//! One line of a dataset (or one Parquet row, as JSON): the three layouts and what makes a line
//! unusable.
//!
//! - `text`: `{"text": "..."}`, continued pre-training on domain text;
//! - `prompt_completion`: `{"prompt": "...", "completion": "..."}`;
//! - `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`, the
//!   Hugging Face / OpenAI chat layout.
//!
//! Parsing returns the first problem of a line as a message; the caller adds `file:line`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Text,
    PromptCompletion,
    Messages,
}

impl Format {
    pub const NAMES: [&'static str; 3] = ["text", "prompt_completion", "messages"];

    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "text" => Some(Format::Text),
            "prompt_completion" => Some(Format::PromptCompletion),
            "messages" | "chat" => Some(Format::Messages),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt_completion",
            Format::Messages => "messages",
        }
    }

    /// The layout of a JSON line, from its keys; None when it matches none of them.
    pub fn detect(line: &str) -> Option<Format> {
        let value: Value = serde_json::from_str(line).ok()?;
        let o = value.as_object()?;
        if o.contains_key("messages") {
            Some(Format::Messages)
        } else if o.contains_key("prompt") && o.contains_key("completion") {
            Some(Format::PromptCompletion)
        } else if o.contains_key("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result: rendered where the template renders it, never learned.
    Tool,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    /// The text: the content string, or the text of its parts in order.
    pub content: String,
    /// The content as given when it is a list of parts (`[{"type": "text", "text": ...}]`, as
    /// Gemma's and multimodal templates take it): the template gets the list.
    pub parts: Option<Vec<Value>>,
    /// Every other field of the message (`tool_calls`, `name`, `reasoning_content`, ...),
    /// handed to the template as given: one that does not use them ignores them.
    pub extra: serde_json::Map<String, Value>,
}

/// What the template sees: the message as it was given.
impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2 + self.extra.len()))?;
        map.serialize_entry("role", &self.role)?;
        match &self.parts {
            Some(parts) => map.serialize_entry("content", parts)?,
            None => map.serialize_entry("content", &self.content)?,
        }
        for (k, v) in &self.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The text of a content given as a list of parts; only text parts are supported.
fn text_of_parts(i: usize, parts: &[Value]) -> Result<String, String> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        let kind = part.get("type").and_then(Value::as_str);
        match (kind, part.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some("text"), _) => return Err(format!("{at}: a text part needs a string `text`")),
            (Some(other), _) => {
                return Err(format!(
                    "{at}: `{other}` parts are not supported; fine-tuning here is text only, give text parts or a string"
                ))
            }
            (None, _) => {
                return Err(format!(
                    "{at}: expected a part object with `type` (\"text\") and `text`"
                ))
            }
        }
    }
    Ok(text)
}

impl Message {
    pub fn new(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
            parts: None,
            extra: serde_json::Map::new(),
        }
    }

    /// An assistant turn that calls tools (it may have no text of its own).
    pub fn calls_tools(&self) -> bool {
        self.extra
            .get("tool_calls")
            .is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Messages(Vec<Message>),
}

fn string_field(o: &serde_json::Map<String, Value>, field: &str) -> Result<String, String> {
    match o.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "field `{field}` must be a string, got {}",
            kind_of(other)
        )),
        None => Err(format!("missing field `{field}`")),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn blank(s: &str) -> bool {
    s.trim().is_empty()
}

fn message(i: usize, v: &Value) -> Result<Message, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("messages[{i}] must be an object with `role` and `content`"))?;
    let role = string_field(o, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
    let role = match role.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(format!(
                "messages[{i}]: bad role `{other}`; expected system, user, assistant or tool"
            ))
        }
    };
    let mut extra = o.clone();
    extra.remove("role");
    // An assistant turn of tool calls may have null content, as OpenAI's format writes it.
    let mut parts = None;
    let content = match extra.remove("content") {
        Some(Value::Null) | None if role == Role::Assistant && extra.contains_key("tool_calls") => {
            String::new()
        }
        Some(Value::String(s)) => s,
        Some(Value::Array(list)) => {
            let text = text_of_parts(i, &list)?;
            parts = Some(list);
            text
        }
        Some(other) => {
            return Err(format!(
                "messages[{i}]: field `content` must be a string or a list of text parts, got {}",
                kind_of(&other)
            ))
        }
        None => return Err(format!("messages[{i}]: missing field `content`")),
    };
    Ok(Message {
        role,
        content,
        parts,
        extra,
    })
}

/// Parses one non-blank line in the given layout.
pub fn parse(line: &str, format: Format) -> Result<Record, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let o = value
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", kind_of(&value)))?;
    match format {
        Format::Text => {
            let text = string_field(o, "text")?;
            if blank(&text) {
                return Err("`text` is empty or whitespace only".into());
            }
            Ok(Record::Text(text))
        }
        Format::PromptCompletion => {
            let prompt = string_field(o, "prompt")?;
            let completion = string_field(o, "completion")?;
            if blank(&completion) {
                return Err("`completion` (the answer) is empty or whitespace only".into());
            }
            Ok(Record::PromptCompletion { prompt, completion })
        }
        Format::Messages => {
            let list = match o.get("messages") {
                Some(Value::Array(list)) => list,
                Some(other) => {
                    return Err(format!(
                        "field `messages` must be a list, got {}",
                        kind_of(other)
                    ))
                }
                None => return Err("missing field `messages`".into()),
            };
            let messages = list
                .iter()
                .enumerate()
                .map(|(i, v)| message(i, v))
                .collect::<Result<Vec<_>, _>>()?;
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                return Err("conversation has no assistant turn, so there is nothing to learn; add the answer as a message with role `assistant`".into());
            }
            if let Some(i) = messages
                .iter()
                .position(|m| m.role == Role::Assistant && blank(&m.content) && !m.calls_tools())
            {
                return Err(format!(
                    "messages[{i}]: assistant answer is empty or whitespace only"
                ));
            }
            Ok(Record::Messages(messages))
        }
    }
}

/// The `text` of every non-blank record of a JSON Lines or Parquet file (for scoring); the
/// first bad one is an error naming file and line (row).
pub fn read_texts(path: &std::path::Path) -> Result<Vec<String>, crate::DataError> {
    let mut records = crate::source::Records::open(path)?;
    let mut texts = Vec::new();
    let mut line = 0;
    while let Some(bytes) = records.next_record()? {
        line += 1;
        let bad = |message: String| crate::DataError::Line {
            path: path.display().to_string(),
            line,
            message,
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not valid UTF-8".into()))?;
        if text.trim().is_empty() {
            continue;
        }
        match parse(text, Format::Text).map_err(bad)? {
            Record::Text(t) => texts.push(t),
            _ => unreachable!("parse returns the requested layout"),
        }
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_messages_and_extra_fields_pass_through() {
        let line = r#"{"messages":[{"role":"user","content":"weather?"},{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"w","arguments":{}}}]},{"role":"tool","content":"sunny","name":"w"},{"role":"assistant","content":"Sunny."}]}"#;
        let Record::Messages(m) = parse(line, Format::Messages).unwrap() else {
            panic!("messages");
        };
        assert_eq!(m[1].content, "");
        assert!(m[1].calls_tools());
        assert_eq!(m[2].role, Role::Tool);
        assert_eq!(m[2].extra["name"], "w");
        // The template sees the fields as given.
        let json = serde_json::to_value(&m[2]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"role": "tool", "content": "sunny", "name": "w"})
        );
        // Null content is only for an assistant turn that calls tools.
        let err = parse(
            r#"{"messages":[{"role":"user","content":null},{"role":"assistant","content":"a"}]}"#,
            Format::Messages,
        )
        .unwrap_err();
        assert!(
            err.contains(
                "messages[0]: field `content` must be a string or a list of text parts, got null"
            ),
            "{err}"
        );
        // Content as a list of text parts: the text for us, the list for the template.
        let line = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]},{"role":"assistant","content":"Hello."}]}"#;
        let Record::Messages(m) = parse(line, Format::Messages).unwrap() else {
            panic!("messages");
        };
        assert_eq!(m[0].content, "Hi there");
        let json = serde_json::to_value(&m[0]).unwrap();
        assert_eq!(json["content"][1]["text"], "there");
        let image = r#"{"messages":[{"role":"user","content":[{"type":"image","url":"x.png"}]},{"role":"assistant","content":"a cat"}]}"#;
        let err = parse(image, Format::Messages).unwrap_err();
        assert!(
            err.contains("messages[0].content[0]: `image` parts are not supported"),
            "{err}"
        );
    }

    #[test]
    fn each_layout_parses_and_detects() {
        let chat =
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
        assert_eq!(Format::detect(chat), Some(Format::Messages));
        assert_eq!(
            Format::detect(r#"{"prompt":"a","completion":"b"}"#),
            Some(Format::PromptCompletion)
        );
        assert_eq!(Format::detect(r#"{"text":"a"}"#), Some(Format::Text));
        assert_eq!(Format::detect(r#"{"body":"a"}"#), None);
        match parse(chat, Format::Messages).unwrap() {
            Record::Messages(m) => {
                assert_eq!(m.len(), 2);
                assert_eq!(m[1].role, Role::Assistant);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_kind_of_bad_line_gets_its_own_message() {
        let cases = [
            (Format::Text, "{\"text\": ", "malformed JSON"),
            (Format::Text, "[1]", "expected a JSON object, got a list"),
            (Format::Text, r#"{"txt":"a"}"#, "missing field `text`"),
            (
                Format::Text,
                r#"{"text":3}"#,
                "must be a string, got a number",
            ),
            (Format::Text, r#"{"text":"  "}"#, "empty or whitespace"),
            (
                Format::PromptCompletion,
                r#"{"prompt":"q","completion":"\n"}"#,
                "`completion` (the answer) is empty",
            ),
            (
                Format::Messages,
                r#"{"messages":[{"role":"bot","content":"x"}]}"#,
                "messages[0]: bad role `bot`",
            ),
            (
                Format::Messages,
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                "no assistant turn",
            ),
            (
                Format::Messages,
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":" "}]}"#,
                "messages[1]: assistant answer is empty",
            ),
            (
                Format::Messages,
                r#"{"messages":[{"role":"user"}]}"#,
                "messages[0]: missing field `content`",
            ),
        ];
        for (format, line, want) in cases {
            let err = parse(line, format).unwrap_err();
            assert!(err.contains(want), "{line}: got `{err}`, want `{want}`");
        }
    }
}
