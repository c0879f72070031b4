#!/usr/bin/env bash
# Regenerates the committed tiny base model: data and tokenizer from generate.py, weights by
# pretraining with ferrotune itself (pretrain.yaml). Run from anywhere after `make build`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python3 "$here/generate.py"
rm -rf "$here/runs/pretrain"
"$root/target/release/coordinator" launch "$here/pretrain.yaml"
latest=$(cat "$here/runs/pretrain/latest")
cp "$here/runs/pretrain/$latest/model.safetensors" "$here/base/model.safetensors"
echo "base model written to $here/base/model.safetensors"
