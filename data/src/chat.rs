//! Chat templates: the model's Jinja `chat_template` rendered with minijinja configured as
//! transformers configures Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`), and the byte spans of the assistant turns in the
//! rendered text, which become the loss mask.
//!
//! Spans are found by rendering prefixes of the conversation: an assistant turn i starts where
//! `messages[..i]` rendered with the generation prompt ends, and ends where `messages[..=i]`
//! rendered without it ends. So the end-of-turn marker the template writes after an answer is
//! learned, and the assistant header is not. A template whose renders are not prefixes of each
//! other (one that rewrites earlier turns) is refused with a message, never guessed at.

use crate::record::{Message, Role};
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;
use std::ops::Range;

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// A rendered conversation and the byte ranges of its assistant turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("chat template does not parse: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template a job uses: `configured` (from cluster.yaml) or the model's own, with the
    /// model's bos/eos texts; None when neither exists.
    pub fn resolve(
        tokenizer: &crate::Tokenizer,
        configured: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let source = match configured {
            Some(s) => s.to_string(),
            None => match Self::source_from_tokenizer_config(&tokenizer.config) {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let (bos, eos) = (text(tokenizer.special.bos), text(tokenizer.special.eos));
        Self::new(&source, &bos, &eos).map(Some)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template of a tokenizer_config.json: `chat_template` as a string, or the `default`
    /// entry of a list of named templates. None when there is none.
    pub fn source_from_tokenizer_config(config: &Json) -> Option<String> {
        match config.get("chat_template")? {
            Json::String(s) => Some(s.clone()),
            Json::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(String::from),
            _ => None,
        }
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| format!("chat template failed: {e:#}"))
    }

    /// The whole conversation and where each assistant turn lies in it.
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered, String> {
        let text = self.render(messages, false)?;
        let mut assistant = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !text.starts_with(&before)
                || !text.starts_with(&through)
                || through.len() < before.len()
            {
                return Err(format!(
                    "the chat template renders messages[..{i}] differently inside the whole conversation, so assistant turn {i} cannot be located; use a template that only appends turns"
                ));
            }
            assistant.push(before.len()..through.len());
        }
        Ok(Rendered { text, assistant })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    const SIMPLE: &str = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

    #[test]
    fn spans_cover_exactly_the_answers_and_their_end_markers() {
        let t = ChatTemplate::new(SIMPLE, "[B]", "</s>").unwrap();
        let conv = [
            msg(Role::System, "be brief"),
            msg(Role::User, "hi "),
            msg(Role::Assistant, "hello"),
            msg(Role::User, "bye"),
            msg(Role::Assistant, "ciao"),
        ];
        let r = t.render_with_spans(&conv).unwrap();
        assert!(r
            .text
            .starts_with("[B]<system>be brief</s>\n<user>hi</s>\n"));
        let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, ["hello</s>\n", "ciao</s>\n"]);
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[msg(Role::User, " a ")], false).unwrap(), "A");
        let err = t.render(&[msg(Role::System, "a")], false).unwrap_err();
        assert!(err.contains("first must be user"), "{err}");
    }

    #[test]
    fn a_template_that_rewrites_history_is_refused() {
        // Shows only the last message: a prefix render is not a prefix of the whole.
        let t = ChatTemplate::new(
            "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render_with_spans(&[msg(Role::User, "q"), msg(Role::Assistant, "a")])
            .unwrap_err();
        assert!(err.contains("cannot be located"), "{err}");
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "")
            .err()
            .unwrap();
        assert!(err.contains("does not parse"), "{err}");
    }
}
