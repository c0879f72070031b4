//! Chat templates rendered by ferrotune (minijinja) against transformers' apply_chat_template,
//! on a Llama-3-style and a ChatML-style template, and the loss mask they give.

mod common;

use ferrotune_data::chat::ChatTemplate;
use ferrotune_data::encode::Encoder;
use ferrotune_data::record::{self, Record};
use ferrotune_data::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const SPECIALS: [&str; 5] = [
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
];

fn fixtures() -> PathBuf {
    common::repo_root().join("tests/fixtures/chat")
}

/// The tiny byte-level tokenizer plus the templates' special tokens, and a tokenizer_config.json
/// holding `template`.
fn model_dir(dir: &Path, template: &str) {
    let base = common::repo_root().join("examples/tiny/base");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer.json")).unwrap())
            .unwrap();
    for (i, s) in SPECIALS.iter().enumerate() {
        let id = 259 + i;
        tok["added_tokens"].as_array_mut().unwrap().push(json!({
            "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
        tok["model"]["vocab"][s] = json!(id);
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
}

const REFERENCE: &str = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for line in open(sys.argv[2], encoding="utf-8"):
    msgs = json.loads(line)["messages"]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    out.append({
        "text": tok.apply_chat_template(msgs, tokenize=False),
        "ids": list(ids),
        "prompt": tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True),
    })
print(json.dumps(out))
"#;

fn conversations() -> Vec<Vec<record::Message>> {
    common::conversations(&fixtures().join("conversations.jsonl"))
}

/// The decoded learned tokens of a conversation.
fn learned_text(tok: &Tokenizer, template: &ChatTemplate, msgs: &[record::Message]) -> String {
    let enc = Encoder {
        tokenizer: tok,
        template: Some(template),
        train_on_inputs: false,
    };
    let e = enc.encode(&Record::Messages(msgs.to_vec())).unwrap();
    let ids: Vec<u32> = (1..e.tokens.len())
        .filter(|&i| e.targets[i])
        .map(|i| e.tokens[i])
        .collect();
    tok.decode_all(&ids).unwrap()
}

fn check(template_file: &str, answer_end: &str, strip: fn(&str) -> String) {
    let root = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(fixtures().join(template_file)).unwrap();
    model_dir(root.path(), &source);
    let tok = Tokenizer::from_model_dir(root.path()).unwrap();
    let template = ChatTemplate::resolve(&tok, None, &Default::default())
        .unwrap()
        .unwrap();
    let convs = conversations();

    // The loss covers each answer and its end-of-turn marker, nothing else.
    for msgs in &convs {
        let expected: String = msgs
            .iter()
            .filter(|m| m.role == record::Role::Assistant)
            .map(|m| strip(&m.content) + answer_end)
            .collect();
        assert_eq!(learned_text(&tok, &template, msgs), expected);
    }

    let Some(python) = common::python() else {
        return;
    };
    let out = common::run_python(
        &python,
        REFERENCE,
        &[
            root.path().to_str().unwrap(),
            fixtures().join("conversations.jsonl").to_str().unwrap(),
        ],
    );
    let reference: Vec<Value> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(reference.len(), convs.len());
    for (i, (msgs, r)) in convs.iter().zip(&reference).enumerate() {
        let text = template.render(msgs, false).unwrap();
        assert_eq!(
            text,
            r["text"].as_str().unwrap(),
            "{template_file} conversation {i}"
        );
        let prompt = template.render(&msgs[..msgs.len() - 1], true).unwrap();
        assert_eq!(
            prompt,
            r["prompt"].as_str().unwrap(),
            "{template_file} prompt {i}"
        );
        let enc = Encoder {
            tokenizer: &tok,
            template: Some(&template),
            train_on_inputs: false,
        };
        let ids = enc.encode(&Record::Messages(msgs.clone())).unwrap().tokens;
        let want: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "{template_file} token ids {i}");
    }
}

#[test]
fn llama3_style_template_matches_transformers() {
    check("llama3.jinja", "<|eot_id|>", |s| s.trim().to_string());
}

#[test]
fn chatml_style_template_matches_transformers() {
    check("chatml.jinja", "<|im_end|>\n", |s| s.trim().to_string());
}
