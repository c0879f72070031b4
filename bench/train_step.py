"""Training-step throughput: ferrotune's worker code vs PyTorch eager, same model shape, batch,
sequence length and thread count, measured alternately in one run (these machines are shared
and noisy, so only the ratio within one run means anything). Then peak memory with and without
activation checkpointing.

usage: python bench/train_step.py [--rounds 3] [--threads N] [--batch 4] [--seq 256]
Needs target/release/train-step (make bench builds it) and a Python with torch + transformers
(.venv from make venv).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A ~30M-parameter Llama: big enough that kernels dominate, small enough for a 2-core CPU.
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=8192,
              hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    ours_bin = os.path.join(ROOT, "target", "release", "train-step")
    with tempfile.TemporaryDirectory() as model:
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(CONFIG, f)
        common = ["--model", model, "--batch", str(args.batch), "--seq", str(args.seq),
                  "--steps", str(args.steps), "--threads", str(args.threads)]
        ours_cmd = [ours_bin] + common
        torch_cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_train_step.py")] + common
        ours, theirs = [], []
        for r in range(args.rounds):
            # Alternate which goes first, so drift in machine load hits both alike.
            order = [(ours_cmd, ours), (torch_cmd, theirs)]
            for cmd, sink in (order if r % 2 == 0 else order[::-1]):
                sink.append(run(cmd))
        o = statistics.median(x["tokens_per_s"] for x in ours)
        t = statistics.median(x["tokens_per_s"] for x in theirs)
        print(f"model: {json.dumps(CONFIG)}")
        print(f"batch {args.batch} x seq {args.seq}, {args.threads} threads, {args.steps} timed "
              f"steps after 2 warm-up, {args.rounds} alternating rounds (median)")
        print(f"ferrotune     tokens/s: {o:10.1f}   rounds: {[round(x['tokens_per_s'], 1) for x in ours]}")
        print(f"pytorch eager tokens/s: {t:10.1f}   rounds: {[round(x['tokens_per_s'], 1) for x in theirs]}")
        print(f"ratio ferrotune / pytorch eager: {o / t:.3f}")

        ckpt = run(ours_cmd + ["--activation-checkpointing"])
        plain = ours[0]
        print(f"activation checkpointing (ferrotune): peak RSS {plain['peak_rss_mib']:.0f} MiB -> "
              f"{ckpt['peak_rss_mib']:.0f} MiB ({1 - ckpt['peak_rss_mib'] / plain['peak_rss_mib']:.1%} "
              f"less), tokens/s {plain['tokens_per_s']:.1f} -> {ckpt['tokens_per_s']:.1f}")


if __name__ == "__main__":
    main()
