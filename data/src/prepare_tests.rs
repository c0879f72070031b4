use super::*;
use crate::pack::{NullSink, Overlong};
use std::path::PathBuf;

fn tiny_base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny/base")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(&tiny_base()).unwrap()
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

fn recipe<'a>(
    data: &'a Path,
    format: Format,
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    seq_len: usize,
) -> Recipe<'a> {
    Recipe {
        data,
        format,
        tokenizer_dir: Box::leak(Box::new(tiny_base())),
        tokenizer,
        template,
        train_on_inputs: false,
        pack: PackOptions {
            seq_len,
            packing: true,
            overlong: Overlong::Truncate,
        },
    }
}

fn write(lines: &[&str]) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), lines.join("\n") + "\n").unwrap();
    f
}

#[test]
fn each_bad_line_gets_one_located_message() {
    let tok = tokenizer();
    let template = ChatTemplate::new(TEMPLATE, "<|bos|>", "<|eos|>").unwrap();
    let long = "x".repeat(300);
    let lines = [
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
        r#"{"messages":[{"role":"user","content":"hi"}"#,
        r#"{"messages":[{"role":"user","content":"ok"},{"role":"bot","content":"no"}]}"#,
        r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"q"}]}"#,
        r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"  "}]}"#,
        r#"{"text":"wrong layout"}"#,
        "",
        r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
    ];
    let long_line = format!(
        r#"{{"messages":[{{"role":"user","content":"q"}},{{"role":"assistant","content":"{long}"}}]}}"#
    );
    let mut all: Vec<&str> = lines.to_vec();
    all.push(&long_line);
    let file = write(&all);
    let r = recipe(file.path(), Format::Messages, &tok, Some(&template), 64);
    let report = prepare("chat", &r, &mut NullSink).unwrap();
    let located: Vec<(u64, Severity, &str)> = report
        .issues
        .iter()
        .map(|i| (i.line, i.severity, i.message.as_str()))
        .collect();
    let expect = [
        (2, Severity::Error, "malformed JSON"),
        (3, Severity::Error, "bad role `bot`"),
        (4, Severity::Error, "no assistant turn"),
        (5, Severity::Error, "assistant answer is empty"),
        (6, Severity::Error, "missing field `messages`"),
        (8, Severity::Warning, "exact duplicate of line 1"),
        (
            9,
            Severity::Warning,
            "longer than data.seq_len + 1 = 65; truncated",
        ),
    ];
    assert_eq!(located.len(), expect.len(), "{located:#?}");
    for (got, want) in located.iter().zip(expect) {
        assert_eq!((got.0, got.1), (want.0, want.1), "{got:?}");
        assert!(
            got.2.contains(want.2),
            "line {}: `{}` lacks `{}`",
            got.0,
            got.2,
            want.2
        );
    }
    assert_eq!((report.errors, report.warnings), (5, 2));
    assert_eq!(
        (report.samples, report.duplicates, report.overlong),
        (3, 1, 1)
    );
    assert_eq!(report.pack.truncated, 1);
    let text = report.to_string();
    assert!(
        text.contains(&format!(
            "{}:2: error: malformed JSON",
            file.path().display()
        )),
        "{text}"
    );
}

/// A JSON Lines file saved with a UTF-8 byte-order mark (PowerShell, Excel) reads as the same
/// file without it: the format is detected and line 1 parses.
#[test]
fn a_byte_order_mark_is_read_away() {
    let tok = tokenizer();
    let lines = [r#"{"text":"first line"}"#, r#"{"text":"second line"}"#];
    let plain = write(&lines);
    let marked = tempfile::NamedTempFile::new().unwrap();
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(plain.path()).unwrap());
    std::fs::write(marked.path(), bytes).unwrap();
    assert_eq!(
        crate::source::Records::first(marked.path())
            .unwrap()
            .as_deref(),
        Some("{\"text\":\"first line\"}\n")
    );
    assert_eq!(
        Format::detect(
            &crate::source::Records::first(marked.path())
                .unwrap()
                .unwrap()
        ),
        Some(Format::Text)
    );
    let report =
        |f: &Path| prepare("t", &recipe(f, Format::Text, &tok, None, 64), &mut NullSink).unwrap();
    let (with, without) = (report(marked.path()), report(plain.path()));
    assert_eq!(with.errors, 0, "{with}");
    assert_eq!(
        (with.samples, with.lengths.clone()),
        (without.samples, without.lengths.clone())
    );
}

/// Decodes the learned tokens (those with a label) of an encoded sample.
fn learned(tok: &Tokenizer, e: &crate::encode::Encoded) -> String {
    let ids: Vec<u32> = e
        .tokens
        .iter()
        .zip(&e.targets)
        .skip(1)
        .filter(|(_, &t)| t)
        .map(|(&id, _)| id)
        .collect();
    tok.decode_all(&ids).unwrap()
}

#[test]
fn the_loss_covers_only_answers_unless_training_on_inputs() {
    let tok = tokenizer();
    let template = ChatTemplate::new(TEMPLATE, "<|bos|>", "<|eos|>").unwrap();
    let mut enc = Encoder {
        tokenizer: &tok,
        template: Some(&template),
        train_on_inputs: false,
    };
    let pc = record::parse(
        r#"{"prompt":"Q: 2+2?\nA:","completion":" 4"}"#,
        Format::PromptCompletion,
    )
    .unwrap();
    let e = enc.encode(&pc).unwrap();
    assert_eq!(learned(&tok, &e), " 4<|eos|>");
    assert_eq!(e.target_count(), 3);

    let chat = record::parse(
        r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"u1"},{"role":"assistant","content":"a1"},{"role":"user","content":"u2"},{"role":"assistant","content":"a2!"}]}"#,
        Format::Messages,
    )
    .unwrap();
    let e = enc.encode(&chat).unwrap();
    assert_eq!(learned(&tok, &e), "a1<|eos|>a2!<|eos|>");
    assert_eq!(
        tok.decode_all(&e.tokens).unwrap(),
        "<|bos|><system>S<|eos|><user>u1<|eos|><assistant>a1<|eos|><user>u2<|eos|><assistant>a2!<|eos|>"
    );

    enc.train_on_inputs = true;
    let e = enc.encode(&chat).unwrap();
    assert_eq!(e.target_count(), e.tokens.len() - 1);
    let e = enc.encode(&pc).unwrap();
    assert_eq!(e.target_count(), e.tokens.len() - 1);
}

#[test]
fn percentiles_and_keys() {
    let tok = tokenizer();
    // Lengths 1..=100 characters → 2..=101 tokens with EOS (byte-level, no merges).
    let lines: Vec<String> = (1..=100)
        .map(|n| serde_json::json!({ "text": "a".repeat(n) }).to_string())
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let file = write(&refs);
    let r = recipe(file.path(), Format::Text, &tok, None, 512);
    let report = prepare("t", &r, &mut NullSink).unwrap();
    assert_eq!(
        report.lengths,
        Lengths {
            p50: 51,
            p90: 91,
            p99: 100,
            max: 101
        }
    );
    let key = r.key().unwrap();
    let mut other = recipe(file.path(), Format::Text, &tok, None, 256);
    assert_ne!(key, other.key().unwrap(), "seq_len is part of the key");
    other.pack.seq_len = 512;
    assert_eq!(key, other.key().unwrap());
    std::fs::write(file.path(), "{\"text\":\"changed\"}\n").unwrap();
    assert_ne!(
        key,
        other.key().unwrap(),
        "the data's bytes are part of the key"
    );
}
