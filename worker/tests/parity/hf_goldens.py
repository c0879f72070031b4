"""Golden values from Hugging Face transformers for ferrotune's parity tests.

For each case: build a small random model with transformers, save it as a Hugging Face checkpoint
(sharded, or in bfloat16, as the case says), and record in fp32
  - logits and the mean cross-entropy loss on a fixed batch (labels already shifted, -100 ignored),
  - the gradient of that loss for every parameter,
  - a 10-step torch.optim.AdamW trajectory (one batch per step): losses and final parameters.
The Rust tests load the checkpoint with ferrotune's loader and compare.

usage: hf_goldens.py OUT_DIR
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

IGNORE = -100
BATCH, SEQ = 2, 24
TRAJECTORY_STEPS = 10
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2)

CASES = {
    # Llama 3.1 style: grouped-query attention and llama3 rope scaling, sharded checkpoint.
    "llama_gqa_rope_llama3": dict(
        cls="LlamaConfig", save=dict(max_shard_size="40KB"),
        config=dict(COMMON, num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                    rope_theta=500000.0, max_position_embeddings=64,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8))),
    # Llama with tied embeddings, attention and MLP bias, linear rope scaling, bf16 on disk.
    "llama_tied_bias_bf16": dict(
        cls="LlamaConfig", save=dict(dtype=torch.bfloat16),
        config=dict(COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                    attention_bias=True, mlp_bias=True,
                    rope_scaling=dict(rope_type="linear", factor=2.0))),
    # Qwen2: q/k/v bias, tied embeddings (as the small Qwen2 models ship), MQA.
    "qwen2_bias_tied": dict(
        cls="Qwen2Config", save=dict(),
        config=dict(COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                    rope_theta=1000000.0)),
    # Qwen3: per-head RMSNorm of queries and keys before RoPE, explicit head_dim, no biases,
    # separate head.
    "qwen3_qk_norm": dict(
        cls="Qwen3Config", save=dict(),
        config=dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rope_theta=1000000.0, tie_word_embeddings=False)),
    # Gemma 3: offset norms, scaled embeddings, GeGLU, sandwich norms, q/k norms, its own
    # attention scale, sliding and global layers with their own RoPE (linear scaling on the
    # global one), soft-capped logits, tied head, pad token 0 (its embedding gets no gradient).
    "gemma3_text_sliding": dict(
        cls="Gemma3TextConfig", save=dict(),
        config=dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, query_pre_attn_scalar=12, sliding_window=7,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    final_logit_softcapping=30.0,
                    rope_parameters=dict(
                        sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                        full_attention=dict(rope_type="linear", factor=2.0,
                                            rope_theta=1000000.0)))),
    # Gemma 2: Gemma 3's layout without q/k norms, one RoPE, soft-capped attention scores (caps
    # low enough that tanh bends them). transformers runs it eagerly only (no SDPA).
    "gemma2_softcap": dict(
        cls="Gemma2Config", save=dict(), attn="eager",
        config=dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, query_pre_attn_scalar=12, sliding_window=7,
                    attn_logit_softcapping=1.5, final_logit_softcapping=3.0)),
    # Mistral: sliding window shorter than the sequence, explicit head_dim != hidden/heads.
    "mistral_window_head_dim": dict(
        cls="MistralConfig", save=dict(),
        config=dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    sliding_window=7)),
}


def batch(generator, vocab):
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    # Ignore a prompt-like prefix in one row and scattered positions elsewhere.
    labels[0, :5] = IGNORE
    labels[torch.rand((BATCH, SEQ), generator=generator) < 0.15] = IGNORE
    return ids, labels


def loss_fn(model, ids, labels):
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE)
    return logits, loss


def randomize(model, generator):
    # transformers initialises norms to 1 and biases to 0; random values exercise every term.
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.1
            p.copy_(noise + (1.0 if name.endswith("norm.weight") else 0.0))
            if name.endswith("embed_tokens.weight"):
                p.mul_(5.0)


def make_case(out_dir, name, case, seed):
    generator = torch.Generator().manual_seed(seed)
    config = getattr(transformers, case["cls"])(**case["config"])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.float().eval()
    randomize(model, generator)
    model_dir = os.path.join(out_dir, name, "model")
    save = dict(case["save"])
    dtype = save.pop("dtype", None)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(model_dir, **save)
    # The reference is the checkpoint as transformers loads it in fp32 (weights upcast, rotary
    # buffers recomputed), not the in-memory model that wrote it. Attention is transformers'
    # default, SDPA: the kernel ferrotune calls. The eager path (matmul, softmax, matmul) is the
    # same function with other fp32 rounding, and on Qwen2's MQA key bias torch's own eager and
    # SDPA trajectories differ by 7e-4 relative after 10 AdamW steps (see hf_parity.rs).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=case.get("attn", "sdpa"))
    model.eval()

    goldens = {}
    ids, labels = batch(generator, config.vocab_size)
    logits, loss = loss_fn(model, ids, labels)
    loss.backward()
    goldens.update(input_ids=ids, labels=labels, logits=logits.detach(), loss=loss.detach())
    for pname, p in model.named_parameters():
        goldens["grad." + pname] = p.grad.detach().clone()
    model.zero_grad()

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)],
                                  foreach=False, **ADAMW)
    losses = []
    for step in range(TRAJECTORY_STEPS):
        ids, labels = batch(generator, config.vocab_size)
        goldens[f"traj.input_ids.{step}"] = ids
        goldens[f"traj.labels.{step}"] = labels
        _, loss = loss_fn(model, ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    goldens["traj.losses"] = torch.tensor(losses, dtype=torch.float64)
    for pname, p in model.named_parameters():
        goldens["final." + pname] = p.detach().clone()
    save_file({k: v.contiguous() for k, v in goldens.items()},
              os.path.join(out_dir, name, "goldens.safetensors"))
    with open(os.path.join(out_dir, name, "case.json"), "w") as f:
        json.dump(dict(adamw=dict(ADAMW, betas=list(ADAMW["betas"])), steps=TRAJECTORY_STEPS,
                       sharded=bool(save.get("max_shard_size")),
                       dtype=str(dtype or torch.float32).replace("torch.", "")), f, indent=1)


def main():
    out_dir = sys.argv[1]
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for seed, (name, case) in enumerate(sorted(CASES.items())):
        make_case(out_dir, name, case, 1000 + seed)
    with open(os.path.join(out_dir, "versions.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, transformers=transformers.__version__), f)


if __name__ == "__main__":
    main()
