"""The reference for bench/train-step: the same training step in PyTorch eager mode with
transformers' LlamaForCausalLM (its default SDPA attention), gradient clipping and
torch.optim.AdamW, on CPU; with --world N, N processes under DistributedDataParallel over Gloo
(its default 25 MB buckets). Prints one JSON line (rank 0).

usage: torch_train_step.py --model DIR [--batch 4 --seq 256 --warmup 2 --steps 5 --threads 1]
                           [--rank R --world N --port P]
"""
import argparse
import json
import resource
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_config(config).float().train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    trained = model
    if args.world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=args.rank, world_size=args.world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(1 + args.rank)
    decay = [p for p in trained.parameters() if p.dim() >= 2]
    no_decay = [p for p in trained.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay), dict(params=no_decay, weight_decay=0.0)],
                                  lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tokens = args.batch * args.seq

    def step():
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    if args.rank != 0:
        return
    print(json.dumps({
        "impl": "pytorch-eager",
        "torch": torch.__version__,
        "tokens_per_s": args.steps * tokens / seconds,
        "step_s": seconds / args.steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "activation_checkpointing": args.activation_checkpointing,
        "world_size": args.world,
    }))


if __name__ == "__main__":
    main()
