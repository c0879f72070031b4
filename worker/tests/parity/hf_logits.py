"""Loads checkpoints with transformers' AutoModelForCausalLM.from_pretrained (as users do) and
writes their fp32 logits on given token ids.

usage: hf_logits.py JOBS.json
JOBS.json: [{"model_dir": ..., "ids": FILE.safetensors holding `input_ids`, "out": FILE}, ...]
"""
import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file


def main():
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        # SDPA where the model supports it (Gemma 2's soft-capped attention does not).
        config = transformers.AutoConfig.from_pretrained(job["model_dir"])
        attn = "eager" if config.model_type == "gemma2" else "sdpa"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            job["model_dir"], dtype=torch.float32, attn_implementation=attn)
        model.eval()
        ids = load_file(job["ids"])["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        save_file({"logits": logits.contiguous()}, job["out"])


if __name__ == "__main__":
    main()
