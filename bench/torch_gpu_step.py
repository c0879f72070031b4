"""The PyTorch eager reference for the GPU training step, and the bf16 matmul peak the MFU is
measured against (bench/gpu_bench.py runs it alternately with ferrotune's train-step).

Step: a Llama of the given config.json on cuda:0 with fp32 weights under bf16 autocast (fp32
masters and AdamW state, bf16 compute: what ferrotune's `precision: bf16` does), clipping and
`torch.optim.AdamW(fused=True)`. transformers' LlamaForCausalLM when transformers is installed,
else the minimal Llama below (same math: RMSNorm, RoPE, GQA through SDPA, SwiGLU), so the
benchmark runs on a GPU machine with only torch. Prints one JSON line.

usage: torch_gpu_step.py step --model DIR [--batch 4 --seq 2048 --warmup 3 --steps 10]
                              [--activation-checkpointing]
       torch_gpu_step.py peak
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh, self.nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c.get("head_dim") or h // self.nh
        self.q = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o = nn.Linear(self.nh * self.hd, h, bias=False)
        i = c["intermediate_size"]
        self.gate = nn.Linear(h, i, bias=False)
        self.up = nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)
        self.n1 = RMSNorm(h, c["rms_norm_eps"])
        self.n2 = RMSNorm(h, c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        y = self.n1(x)
        q = self.q(y).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = self.k(y).view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = self.v(y).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class MinimalLlama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.checkpointing = False
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, labels):
        hd = self.layers[0].hd
        inv = 1.0 / (self.c.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, device=ids.device).float() / hd))
        t = torch.arange(ids.shape[1], device=ids.device).float()
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        x = self.embed(ids)
        for layer in self.layers:
            if self.checkpointing:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def build(model_dir, activation_checkpointing):
    with open(f"{model_dir}/config.json") as f:
        config = json.load(f)
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        if activation_checkpointing:
            model.gradient_checkpointing_enable()
        loss = lambda ids, labels: model(input_ids=ids, labels=labels).loss
        return model, loss, "transformers LlamaForCausalLM"
    except ImportError:
        model = MinimalLlama(config)
        model.checkpointing = activation_checkpointing
        return model, model, "minimal PyTorch Llama (no transformers here)"


def step_main(args):
    torch.manual_seed(0)
    model, loss_fn, impl = build(args.model, args.activation_checkpointing)
    model = model.float().cuda().train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.c["vocab_size"]

    def step():
        ids = torch.randint(vocab, (args.batch, args.seq + 1), device="cuda")
        x, y = ids[:, :-1], ids[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(x, x) if impl.startswith("transformers") else loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    peak = 0.0
    for _ in range(args.steps):
        step()
        free, total = torch.cuda.mem_get_info()
        peak = max(peak, (total - free) / 2**20)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "impl": impl, "tokens_per_s": args.steps * args.batch * args.seq / seconds,
        "step_s": seconds / args.steps, "parameters": params, "peak_device_mib": peak,
        "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "activation_checkpointing": args.activation_checkpointing,
        "torch": torch.__version__,
    }))


def peak_main(_args):
    """bf16 dense matmul throughput, the denominator of MFU, measured on this GPU now."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / 20)
    print(json.dumps({"bf16_matmul_tflops": 2 * n**3 / best / 1e12,
                      "device": torch.cuda.get_device_name(0), "torch": torch.__version__}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step")
    s.add_argument("--model", required=True)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq", type=int, default=2048)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--activation-checkpointing", action="store_true")
    sub.add_parser("peak")
    args = ap.parse_args()
    {"step": step_main, "peak": peak_main}[args.command](args)


if __name__ == "__main__":
    main()
