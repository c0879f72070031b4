"""GPU training-step figures: ferrotune's train-step (CUDA, bf16 compute, NCCL at world size 1)
against PyTorch eager (bench/torch_gpu_step.py) on the same shape, batch and sequence length,
alternately in one run, with and without activation checkpointing; MFU against the bf16 matmul
peak measured in the same run. Writes results.json and results.md into --out after every
measurement, so a run cut short still leaves what it measured.

usage: gpu_bench.py --train-step BIN --out DIR [--rounds 2] [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    # GPT-3 Small / OPT-125M widths in Llama form.
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 tie_word_embeddings=False, batch=8),
    # Llama 3.2 1B.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, batch=4),
}
SEQ = 2048


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_dir(root, name, shape):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"],
                  max_position_embeddings=SEQ * 2, rms_norm_eps=1e-5, rope_theta=500000.0,
                  initializer_range=0.02,
                  **{k: v for k, v in shape.items() if k != "batch"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    return d


def write(out, figures, notes):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"figures": figures, "notes": notes}, f, indent=2)
    lines = ["| figure | ferrotune | reference | unit | ratio | reference is |", "|---|---|---|---|---|---|"]
    for f in figures:
        lines.append(f"| `{f['name']}` | {f['value']:.4g} | {f['reference']:.4g} | {f['unit']} | "
                     f"{f['ratio']:.3f} | {f['reference_is']} |")
    lines += [""] + [f"- {n}" for n in notes]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-step", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small steps, one round (a smoke run)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    figures, notes = [], []
    peak = run([sys.executable, os.path.join(HERE, "torch_gpu_step.py"), "peak"])
    notes.append(f"device: {peak['device']}; torch {peak['torch']}; bf16 matmul peak measured "
                 f"now: {peak['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3 GEMM)")
    write(args.out, figures, notes)
    steps, warmup = ("3", "1") if args.quick else ("10", "3")
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            d = model_dir(tmp, name, shape)
            batch = str(shape["batch"])
            for ckpt in (False, True):
                ours_cmd = [args.train_step, "--model", d, "--device", "cuda", "--precision", "bf16",
                            "--batch", batch, "--seq", str(SEQ), "--warmup", warmup, "--steps", steps]
                ref_cmd = [sys.executable, os.path.join(HERE, "torch_gpu_step.py"), "step",
                           "--model", d, "--batch", batch, "--seq", str(SEQ), "--warmup", warmup,
                           "--steps", steps]
                if ckpt:
                    ours_cmd.append("--activation-checkpointing")
                    ref_cmd.append("--activation-checkpointing")
                ours, ref = [], []
                for _ in range(rounds):
                    ours.append(run(ours_cmd))
                    ref.append(run(ref_cmd))
                best = max(ours, key=lambda r: r["tokens_per_s"])
                best_ref = max(ref, key=lambda r: r["tokens_per_s"])
                tag = f"{name}_bf16{'_ckpt' if ckpt else ''}"
                # 6 FLOPs per parameter and token (forward 2, backward 4), attention left out.
                mfu = 6 * best["parameters"] * best["tokens_per_s"] / (
                    peak["bf16_matmul_tflops"] * 1e12)
                mfu_ref = 6 * best_ref["parameters"] * best_ref["tokens_per_s"] / (
                    peak["bf16_matmul_tflops"] * 1e12)
                figures += [
                    dict(name=f"gpu_step_{tag}", value=best["tokens_per_s"],
                         reference=best_ref["tokens_per_s"], unit="tokens/s",
                         ratio=best["tokens_per_s"] / best_ref["tokens_per_s"],
                         reference_is=best_ref["impl"] + " eager, AdamW(fused=True), bf16 autocast"),
                    dict(name=f"gpu_mfu_{tag}", value=mfu * 100, reference=mfu_ref * 100, unit="% MFU",
                         ratio=mfu / mfu_ref if mfu_ref else 0.0, reference_is="PyTorch eager, same run"),
                    dict(name=f"gpu_memory_{tag}", value=best["peak_device_mib"],
                         reference=best_ref["peak_device_mib"], unit="MiB in use (driver)",
                         ratio=best["peak_device_mib"] / max(best_ref["peak_device_mib"], 1.0),
                         reference_is="PyTorch eager, same run"),
                ]
                notes.append(f"{tag}: {best['parameters'] / 1e6:.0f}M parameters, batch {batch} x "
                             f"{SEQ} tokens; ferrotune {best['step_s']:.3f} s/step, PyTorch "
                             f"{best_ref['step_s']:.3f} s/step")
                write(args.out, figures, notes)
                print(f"{tag}: {best['tokens_per_s']:.0f} vs {best_ref['tokens_per_s']:.0f} tokens/s, "
                      f"MFU {mfu * 100:.1f}% vs {mfu_ref * 100:.1f}%", flush=True)


if __name__ == "__main__":
    main()
