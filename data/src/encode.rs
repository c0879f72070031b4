//! A record becomes tokens plus a target flag per token (is this token learned?).
//!
//! - text: `tokenizer(text)` (the post-processor's BOS, if any) + EOS; every token learned.
//! - prompt/completion: `tokenizer(prompt)` + `completion` + EOS; only the completion and EOS are
//!   learned unless `train_on_inputs`.
//! - messages: the chat template's text tokenized as `apply_chat_template(tokenize=True)` does
//!   (no special tokens added: the template writes them); a token is learned when it starts inside
//!   an assistant turn, unless `train_on_inputs` (then all are).

use crate::chat::ChatTemplate;
use crate::record::Record;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub targets: Vec<bool>,
}

impl Encoded {
    fn push(&mut self, tokens: &[u32], target: bool) {
        self.tokens.extend_from_slice(tokens);
        self.targets
            .extend(std::iter::repeat_n(target, tokens.len()));
    }

    /// Tokens that are learned (the first token never is: nothing predicts it).
    pub fn target_count(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub train_on_inputs: bool,
}

impl Encoder<'_> {
    pub fn encode(&self, record: &Record) -> Result<Encoded, String> {
        let eos: Vec<u32> = self.tokenizer.special.eos.into_iter().collect();
        let mut out = Encoded::default();
        match record {
            Record::Text(text) => {
                out.push(&self.tokenizer.encode_with(text, true)?, true);
                out.push(&eos, true);
            }
            Record::PromptCompletion { prompt, completion } => {
                out.push(
                    &self.tokenizer.encode_with(prompt, true)?,
                    self.train_on_inputs,
                );
                out.push(&self.tokenizer.encode(completion)?, true);
                out.push(&eos, true);
            }
            Record::Messages(messages) => {
                let template = self.template.ok_or(
                    "a `messages` dataset needs a chat template, and the model's tokenizer_config.json has no `chat_template`; set data.chat_template or data.chat_template_file",
                )?;
                let rendered = template.render_with_spans(messages)?;
                for (id, range) in self.tokenizer.encode_with_offsets(&rendered.text)? {
                    let learned = self.train_on_inputs
                        || rendered.assistant.iter().any(|s| s.contains(&range.start));
                    out.tokens.push(id);
                    out.targets.push(learned);
                }
            }
        }
        Ok(out)
    }
}
