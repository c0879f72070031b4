//! Chat templates: the model's Jinja `chat_template` rendered with minijinja configured as
//! transformers configures Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`, extra `chat_template_kwargs`), and the byte spans
//! of the assistant turns in the rendered text, which become the loss mask. Three ways, the
//! first that applies:
//!
//! 1. `{% generation %}` … `{% endgeneration %}` blocks (transformers' standard behind
//!    `return_assistant_tokens_mask`): what they enclose is learned, exactly. minijinja has no
//!    custom tags, so the blocks are rewritten to emit private-use sentinels, which are located
//!    and removed from the text.
//! 2. Prefix renders: an assistant turn i starts where `messages[..i]` rendered with the
//!    generation prompt ends, and ends where `messages[..=i]` rendered without it ends. So the
//!    end-of-turn marker the template writes after an answer is learned, and the assistant header
//!    is not; text the template inserts between the header and the answer is learned too (the
//!    model must produce it after that same prompt at inference).
//! 3. Templates that rewrite history (Qwen3 drops the reasoning of earlier turns and writes an
//!    empty `<think>` block into the last one): the prefix renders are not prefixes of the whole.
//!    Then the whole conversation is rendered once and each assistant turn found in order: after
//!    its header (the generation prompt) the answer's content; learned are the text from the
//!    header's end (an inserted `<think>\n\n</think>\n\n` included, as in 2) through the content
//!    and the end-of-turn marker the template writes after a final answer. A turn whose content
//!    does not appear (a template that rewrites it) is refused naming it, never guessed at.

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
    /// `data.chat_template_kwargs`: extra variables, as `apply_chat_template(**kwargs)` passes.
    kwargs: serde_json::Map<String, Json>,
    /// The template has `{% generation %}` blocks.
    generation_blocks: bool,
}

/// What `{% generation %}` and `{% endgeneration %}` emit (Unicode private use: no tokenizer
/// text, and refused in messages).
const GENERATION_START: char = '\u{E000}';
const GENERATION_END: char = '\u{E001}';

/// Variables the template gets from the renderer, which `chat_template_kwargs` may not set.
pub const RESERVED_VARIABLES: [&str; 4] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with any whitespace control) into tags
/// minijinja knows that emit the sentinels. Each becomes an `if` block around the sentinel,
/// opened and closed with the original tag's own whitespace control, so `trim_blocks` and
/// `lstrip_blocks` treat the text around it as they treated the original tag. None when the
/// template has no such block.
fn rewrite_generation_blocks(source: &str) -> Option<String> {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c) else {
            break;
        };
        let inner = &rest[open + 2..close];
        let left = inner.chars().next().filter(|c| matches!(c, '-' | '+'));
        let right = inner.chars().last().filter(|c| matches!(c, '-' | '+'));
        let word = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+'])
            .trim();
        let (l, r) = (
            left.map(String::from).unwrap_or_default(),
            right.map(String::from).unwrap_or_default(),
        );
        let replacement = match word {
            "generation" => format!(
                "{{%{l} if true %}}{{{{ '{GENERATION_START}' }}}}{{% endif %}}{{% if true {r}%}}"
            ),
            "endgeneration" => format!(
                "{{%{l} endif %}}{{% if true %}}{{{{ '{GENERATION_END}' }}}}{{% endif {r}%}}"
            ),
            _ => {
                out.push_str(&rest[..close + 2]);
                rest = &rest[close + 2..];
                continue;
            }
        };
        found = true;
        out.push_str(&rest[..open]);
        out.push_str(&replacement);
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    found.then_some(out)
}

/// The text with the sentinels removed, and the byte ranges they enclosed (in the new text).
fn take_generation_spans(marked: &str) -> Result<(String, Vec<Range<usize>>), String> {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in marked.chars() {
        match c {
            GENERATION_START if open.is_none() => open = Some(text.len()),
            GENERATION_END => match open.take() {
                Some(start) => spans.push(start..text.len()),
                None => return Err("{% endgeneration %} without {% generation %}".into()),
            },
            GENERATION_START => return Err("{% generation %} blocks nest".into()),
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err("{% generation %} is never closed by {% endgeneration %}".into());
    }
    Ok((text, spans))
}

/// Where an assistant turn is in `text`, from `from` on: (end of its header, start and end of
/// its content). The content is looked for after an occurrence of the header (the whole
/// generation prompt, or its first line: a history turn may lack what the prompt adds, such
/// as an empty think block), before the header's next occurrence; failing that, anywhere from
/// `from`. An empty `contents` (a turn of tool calls only) is the nearest header's end.
fn locate(
    text: &str,
    from: usize,
    header: Option<&str>,
    contents: &[&str],
) -> Option<(Option<usize>, usize, usize)> {
    let find = |within: &str, at: usize| {
        contents
            .iter()
            .find_map(|c| within.find(c).map(|p| (at + p, at + p + c.len())))
    };
    let mut headers: Vec<&str> = header.into_iter().collect();
    if let Some(line) = header.and_then(|h| h.find('\n').map(|n| &h[..=n])) {
        if Some(line) != header {
            headers.push(line);
        }
    }
    if contents.is_empty() {
        // The nearest header: the full one may only occur at a later turn.
        return headers
            .iter()
            .filter_map(|h| text[from..].find(h).map(|p| (p, from + p + h.len())))
            .min()
            .map(|(_, h_end)| (Some(h_end), h_end, h_end));
    }
    for h in headers {
        let mut pos = from;
        while let Some(p) = text[pos..].find(h) {
            let h_end = pos + p + h.len();
            let next = text[h_end..].find(h).map_or(text.len(), |q| h_end + q);
            if let Some((start, end)) = find(&text[h_end..next], h_end) {
                return Some((Some(h_end), start, end));
            }
            pos = h_end;
        }
    }
    find(&text[from..], from).map(|(start, end)| (None, start, end))
}

/// The answer as a history-rewriting template may write it: the content, or (reasoning
/// templates such as Qwen3's and DeepSeek's) what follows its `</think>`, without leading
/// newlines.
fn content_candidates(content: &str) -> Vec<&str> {
    let mut out = vec![content];
    if let Some((_, after)) = content.rsplit_once("</think>") {
        out.push(after.trim_start_matches('\n'));
    }
    let trimmed = content.trim();
    if !out.contains(&trimmed) {
        out.push(trimmed);
    }
    out.retain(|c| !c.is_empty());
    out
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
        Self::with_kwargs(source, bos_token, eos_token, serde_json::Map::new())
    }

    /// A template rendered with extra variables (`data.chat_template_kwargs`).
    pub fn with_kwargs(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        kwargs: serde_json::Map<String, Json>,
    ) -> Result<Self, String> {
        if let Some(k) = kwargs
            .keys()
            .find(|k| RESERVED_VARIABLES.contains(&k.as_str()))
        {
            return Err(format!(
                "chat_template_kwargs: `{k}` is set by the renderer itself; remove it"
            ));
        }
        let rewritten = rewrite_generation_blocks(source);
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
        let generation_blocks = rewritten.is_some();
        env.add_template_owned("chat", rewritten.unwrap_or_else(|| source.to_string()))
            .map_err(|e| format!("chat template does not parse: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            kwargs,
            generation_blocks,
        })
    }

    /// The template a job uses: `configured` (from cluster.yaml) or the model's own, with the
    /// model's bos/eos texts; None when neither exists.
    pub fn resolve(
        tokenizer: &crate::Tokenizer,
        configured: Option<&str>,
        kwargs: &serde_json::Map<String, Json>,
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
        Self::with_kwargs(&source, &bos, &eos, kwargs.clone()).map(Some)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn kwargs(&self) -> &serde_json::Map<String, Json> {
        &self.kwargs
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

    /// The conversation as the template writes it (what `apply_chat_template(tokenize=False)`
    /// returns).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let marked = self.render_marked(messages, add_generation_prompt)?;
        if !self.generation_blocks {
            return Ok(marked);
        }
        Ok(marked
            .chars()
            .filter(|c| !matches!(*c, GENERATION_START | GENERATION_END))
            .collect())
    }

    /// The render with the `{% generation %}` sentinels still in.
    fn render_marked(
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
                ..Value::from(Serde(&self.kwargs))
            })
            .map_err(|e| format!("chat template failed: {e:#}"))
    }

    /// The whole conversation and where each learned assistant turn lies in it.
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered, String> {
        if self.generation_blocks {
            if let Some(i) = messages
                .iter()
                .position(|m| m.content.contains([GENERATION_START, GENERATION_END]))
            {
                return Err(format!(
                    "messages[{i}] holds U+E000 or U+E001, which mark {{% generation %}} blocks"
                ));
            }
            let (text, assistant) = take_generation_spans(&self.render_marked(messages, false)?)?;
            return Ok(Rendered { text, assistant });
        }
        let text = self.render(messages, false)?;
        match self.spans_by_prefix(messages, &text)? {
            Some(assistant) => Ok(Rendered { text, assistant }),
            None => {
                let assistant = self.spans_by_content(messages, &text)?;
                Ok(Rendered { text, assistant })
            }
        }
    }

    /// Spans from prefix renders; None when a prefix is not rendered as it is in `text`.
    fn spans_by_prefix(
        &self,
        messages: &[Message],
        text: &str,
    ) -> Result<Option<Vec<Range<usize>>>, String> {
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
                return Ok(None);
            }
            assistant.push(before.len()..through.len());
        }
        Ok(Some(assistant))
    }

    /// Spans of a template that rewrites history: each assistant turn located in `text` (the
    /// whole conversation rendered once) after its header, in order.
    fn spans_by_content(
        &self,
        messages: &[Message],
        text: &str,
    ) -> Result<Vec<Range<usize>>, String> {
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            // The header: what the generation prompt adds after the messages before this turn.
            let plain = self.render(&messages[..i], false)?;
            let prompted = self.render(&messages[..i], true)?;
            let header = prompted
                .strip_prefix(plain.as_str())
                .filter(|h| !h.is_empty());
            let Some((after_header, start, end)) =
                locate(text, cursor, header, &content_candidates(&m.content))
            else {
                return Err(format!(
                    "the chat template rewrites the conversation and messages[{i}]'s content does not appear in it, so assistant turn {i} cannot be located; use a template that writes each answer as given"
                ));
            };
            let marker = self.end_marker(&messages[..i])?;
            // The marker closes the turn within its own text: before the next message's.
            let limit = messages
                .get(i + 1)
                .map(|next| next.content.trim())
                .filter(|c| !c.is_empty())
                .and_then(|c| text[end..].find(c).map(|p| end + p))
                .unwrap_or(text.len());
            let close = marker
                .filter(|mk| !mk.is_empty())
                .and_then(|mk| {
                    text[end..limit]
                        .find(mk.as_str())
                        .map(|p| end + p + mk.len())
                })
                .unwrap_or(end);
            spans.push(after_header.unwrap_or(start)..close);
            cursor = close;
        }
        Ok(spans)
    }

    /// What the template writes after an assistant turn's content when that turn ends the
    /// conversation (`<|im_end|>\n` for Qwen3): the render of `before` and a probe answer,
    /// after the probe. None when the template does not write the probe as given.
    fn end_marker(&self, before: &[Message]) -> Result<Option<String>, String> {
        const PROBE: &str = "\u{E002}";
        let mut probe = before.to_vec();
        probe.push(Message::new(Role::Assistant, PROBE));
        let text = self.render(&probe, false)?;
        Ok(text
            .rfind(PROBE)
            .map(|p| text[p + PROBE.len()..].to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> Message {
        Message::new(role, content)
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
    fn a_template_that_rewrites_an_answer_is_refused() {
        // Writes every answer upper-cased except the last: the prefix renders are not
        // prefixes of the whole, and turn 1's content is nowhere in it.
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and not loop.last %}{{ m.content.upper() }}{% else %}{{ m.content }}{% endif %}|{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "",
            "",
        )
        .unwrap();
        let conv = [
            msg(Role::User, "q"),
            msg(Role::Assistant, "ok"),
            msg(Role::User, "r"),
            msg(Role::Assistant, "b"),
        ];
        let err = t.render_with_spans(&conv).unwrap_err();
        assert!(
            err.contains("messages[1]'s content does not appear"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "")
            .err()
            .unwrap();
        assert!(err.contains("does not parse"), "{err}");
    }

    /// Qwen3's behaviour in small: history turns lose their reasoning, the turns after the last
    /// user message get a `<think>` block (empty when there is no reasoning), and
    /// `enable_thinking: false` puts an empty one into the generation prompt.
    const REWRITING: &str = "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set content = m.content %}{%- set reasoning = '' %}{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}{%- if loop.index0 > ns.last %}{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}{{- '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}";

    fn spans(r: &Rendered) -> Vec<&str> {
        r.assistant.iter().map(|s| &r.text[s.clone()]).collect()
    }

    #[test]
    fn a_template_that_rewrites_history_has_its_answers_located_in_order() {
        let t = ChatTemplate::new(REWRITING, "", "<|im_end|>").unwrap();
        let conv = [
            msg(Role::System, "be brief"),
            msg(Role::User, "hi"),
            msg(Role::Assistant, "<think>\ngreet back\n</think>\n\nhello"),
            msg(Role::User, "bye"),
            msg(Role::Assistant, "ciao"),
        ];
        let r = t.render_with_spans(&conv).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nciao<|im_end|>\n"
        );
        // The empty think block the template inserts into the last turn is learned, as the
        // model must write it after the same prompt; no user or system text is.
        assert_eq!(
            spans(&r),
            [
                "hello<|im_end|>\n",
                "<think>\n\n</think>\n\nciao<|im_end|>\n"
            ]
        );
        // One turn renders stably: the prefix method gives the same span.
        let single = t.render_with_spans(&conv[3..]).unwrap();
        let whole = t.render_with_spans(&[msg(Role::User, "bye"), msg(Role::Assistant, "ciao")]);
        assert_eq!(spans(&single), spans(&whole.unwrap()));
        assert_eq!(spans(&single), ["<think>\n\n</think>\n\nciao<|im_end|>\n"]);
    }

    #[test]
    fn kwargs_reach_the_template_and_reserved_names_are_refused() {
        let off: serde_json::Map<String, Json> =
            serde_json::from_str(r#"{"enable_thinking": false}"#).unwrap();
        let t = ChatTemplate::with_kwargs(REWRITING, "", "", off).unwrap();
        let prompt = t.render(&[msg(Role::User, "hi")], true).unwrap();
        assert!(
            prompt.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "{prompt}"
        );
        // The think block is then part of the prompt, not learned.
        let r = t
            .render_with_spans(&[msg(Role::User, "hi"), msg(Role::Assistant, "yo")])
            .unwrap();
        assert_eq!(spans(&r), ["yo<|im_end|>\n"]);
        let plain = ChatTemplate::new(REWRITING, "", "").unwrap();
        assert!(plain
            .render(&[msg(Role::User, "hi")], true)
            .unwrap()
            .ends_with("assistant\n"));
        let bad: serde_json::Map<String, Json> =
            serde_json::from_str(r#"{"messages": []}"#).unwrap();
        let err = ChatTemplate::with_kwargs(REWRITING, "", "", bad)
            .err()
            .unwrap();
        assert!(err.contains("`messages` is set by the renderer"), "{err}");
    }

    #[test]
    fn generation_blocks_define_what_is_learned_and_keep_the_whitespace() {
        let source = "{% for m in messages %}\n  {%- if m.role == 'assistant' %}\n<a>\n  {% generation %}\n{{ m.content }}<end>\n  {%- endgeneration %}\n\n  {% else %}\n<{{ m.role }}>{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        // Jinja2 renders a generation block as its body: the same template with `if true`.
        let plain = source
            .replace("{% generation %}", "{% if true %}")
            .replace("{%- endgeneration %}", "{%- endif %}");
        let reference = ChatTemplate::new(&plain, "", "").unwrap();
        let conv = [
            msg(Role::User, "q"),
            msg(Role::Assistant, "a1"),
            msg(Role::User, "r"),
            msg(Role::Assistant, "a2"),
        ];
        let r = t.render_with_spans(&conv).unwrap();
        assert_eq!(r.text, reference.render(&conv, false).unwrap());
        assert_eq!(t.render(&conv, false).unwrap(), r.text);
        assert_eq!(spans(&r), ["a1<end>", "a2<end>"]);
        assert!(rewrite_generation_blocks("{% if x %}{% endif %}").is_none());
        let err = ChatTemplate::new("{% generation %}x", "", "")
            .err()
            .unwrap();
        assert!(err.contains("does not parse"), "{err}");
    }
}
