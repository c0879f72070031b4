"""Per-text loss with transformers, as `worker score` reports it: the model's tokenizer applied
with its special tokens (`tokenizer(text)`), then `model(ids, labels=ids).loss`.

usage: hf_score.py MODEL_DIR INPUT.jsonl   -> JSON lines {"index", "loss", "tokens"}
"""
import json
import sys

import torch
import transformers


def main():
    torch.set_num_threads(1)
    model_dir, path = sys.argv[1], sys.argv[2]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    index = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids
            with torch.no_grad():
                loss = model(input_ids=ids, labels=ids).loss.item()
            print(json.dumps(dict(index=index, loss=loss, tokens=ids.shape[1] - 1)))
            index += 1


if __name__ == "__main__":
    main()
