#!/usr/bin/env python3
"""Generates everything examples/tiny needs except the base weights (see make_base.sh).

- base/tokenizer.json: a byte-level BPE tokenizer (GPT-2 byte alphabet, no merges) plus
  <|bos|>, <|eos|>, <|pad|>; loadable by the `tokenizers` library and transformers.
- base/config.json: a small Llama-architecture config.
- data/general.jsonl: generic English-like sentences, used to pretrain the base model.
- data/train.jsonl, data/eval.jsonl: the fine-tuning domain, equipment incident reports with a
  fixed structure and vocabulary that general text does not show. The held-out loss on
  eval.jsonl is how the demo shows that fine-tuning worked.

Standard library only, seeded: re-running it reproduces the committed files byte for byte.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def tokenizer_json():
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    added = []
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + i
        added.append({"id": 256 + i, "content": tok, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256 + len(SPECIALS),
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
    "torch_dtype": "float32",
}

TOKENIZER_CONFIG = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "model_max_length": 512,
    "tokenizer_class": "PreTrainedTokenizerFast",
}

ANIMALS = ["cat", "dog", "fox", "horse", "bird", "goat", "rabbit", "owl", "bear", "mouse"]
PLACES = ["the garden", "the river", "the old barn", "the forest", "the market", "the hill", "the village", "the lake"]
VERBS = ["walked to", "looked at", "ran past", "slept near", "waited by", "jumped over", "sang in", "played in"]
TIMES = ["In the morning", "At noon", "Later that day", "In the evening", "At night", "On Sunday"]
ADJ = ["small", "quiet", "happy", "brown", "tired", "clever", "young", "old"]


def general_sentence(rng):
    a, b = rng.choice(ANIMALS), rng.choice(ANIMALS)
    forms = [
        f"{rng.choice(TIMES)}, the {rng.choice(ADJ)} {a} {rng.choice(VERBS)} {rng.choice(PLACES)}.",
        f"The {a} and the {b} {rng.choice(VERBS)} {rng.choice(PLACES)} together.",
        f"A {rng.choice(ADJ)} {a} lived near {rng.choice(PLACES)} for {rng.randint(2, 9)} years.",
        f"Nobody knew why the {a} {rng.choice(VERBS)} {rng.choice(PLACES)}.",
    ]
    return rng.choice(forms)


UNITS = ["pump", "valve", "compressor", "conveyor", "chiller", "boiler", "mixer", "press"]
SYMPTOMS = {
    "pump": ["pressure drop on inlet", "cavitation noise", "seal leak at shaft"],
    "valve": ["sticks half open", "actuator not responding", "seat leak under load"],
    "compressor": ["high discharge temperature", "oil carry-over", "short cycling"],
    "conveyor": ["belt misalignment", "roller bearing noise", "motor overload trip"],
    "chiller": ["low refrigerant charge", "condenser fouling", "flow switch fault"],
    "boiler": ["flame failure on start", "low water cutoff trip", "scale on tubes"],
    "mixer": ["gearbox vibration", "paddle wear", "speed sensor drift"],
    "press": ["hydraulic pressure loss", "die misalignment", "guard interlock fault"],
}
ACTIONS = {
    "pump": ["replaced seal kit", "cleared inlet strainer", "realigned coupling"],
    "valve": ["replaced actuator", "lapped valve seat", "recalibrated positioner"],
    "compressor": ["cleaned intercooler", "replaced oil separator", "adjusted pressure switch"],
    "conveyor": ["retensioned belt", "replaced roller bearing", "reset overload relay"],
    "chiller": ["recharged refrigerant", "cleaned condenser coil", "replaced flow switch"],
    "boiler": ["cleaned flame rod", "tested low water cutoff", "descaled tubes"],
    "mixer": ["replaced gearbox bearing", "replaced paddles", "recalibrated speed sensor"],
    "press": ["replaced hydraulic hose", "realigned die", "repaired interlock wiring"],
}
SEVERITY = ["low", "medium", "high"]


def incident(rng):
    unit = rng.choice(UNITS)
    k = rng.randrange(3)
    hours = rng.randint(1, 12)
    lines = [
        f"INCIDENT {rng.randint(1000, 9999)} | unit: {unit}-{rng.randint(1, 20):02d} | severity: {rng.choice(SEVERITY)}",
        f"symptom: {SYMPTOMS[unit][k]}",
        f"action: {ACTIONS[unit][k]}",
        f"status: resolved after {hours}h",
    ]
    return "\n".join(lines)


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def main():
    rng = random.Random(20261124)
    os.makedirs(os.path.join(HERE, "base"), exist_ok=True)
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    with open(os.path.join(HERE, "base", "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f, ensure_ascii=False, indent=1)
    with open(os.path.join(HERE, "base", "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
    with open(os.path.join(HERE, "base", "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    general = [" ".join(general_sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(2500)]
    write_jsonl(os.path.join(HERE, "data", "general.jsonl"), general)
    write_jsonl(os.path.join(HERE, "data", "train.jsonl"), [incident(rng) for _ in range(1500)])
    write_jsonl(os.path.join(HERE, "data", "eval.jsonl"), [incident(rng) for _ in range(120)])


if __name__ == "__main__":
    main()
