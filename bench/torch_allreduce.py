"""One rank of the reference all-reduce: torch.distributed with the Gloo backend on loopback,
float32, summing a tensor of the given size; the same barrier-then-time loop as
bench/src/allreduce.rs. Rank 0 prints one JSON line with the seconds of each timed all-reduce,
plus torch's version (proof that a real torch process produced the reference).

usage: torch_allreduce.py --rank R --world W --port P --mib M [--warmup 2] [--iters 5]
"""
import argparse
import json
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mib", type=float, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                            rank=args.rank, world_size=args.world)
    t = torch.ones(int(args.mib * 1024 * 1024 / 4), dtype=torch.float32)
    seconds = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    expected = float(args.world) ** (args.warmup + args.iters)
    assert abs(t[0].item() - expected) <= expected * 1e-6, (t[0].item(), expected)
    if args.rank == 0:
        print(json.dumps({"seconds": seconds, "torch": torch.__version__}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
