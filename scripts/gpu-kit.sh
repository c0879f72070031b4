#!/usr/bin/env bash
# Builds the kit bench/gpu.sh runs on a GPU host: the CUDA build's worker, coordinator,
# train-step and GPU test binaries (stripped: the device tool carries at most 64 MiB) and the
# Hugging Face goldens (the GPU host may have no transformers). Needs `make build-cuda` first
# (the Makefile's gpu-kit target does both) and the test venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export LIBTORCH="$root/third_party/libtorch-cuda" CARGO_TARGET_DIR="$root/target/cuda"
cargo=${CARGO:-cargo}
python=${PYTHON:-$root/.venv/bin/python}
kit="$root/target/gpu-kit"
rm -rf "$kit.partial"
mkdir -p "$kit.partial/bin" "$kit.partial/goldens"

"$cargo" build --release -p ferrotune-coordinator -p ferrotune-worker -p ferrotune-bench
# The GPU test binary's path is only known from cargo's JSON messages.
tests=$("$cargo" test --release -p ferrotune-worker --test gpu --no-run --message-format=json \
  | "$python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
for bin in worker coordinator train-step; do
  strip -o "$kit.partial/bin/$bin" "$CARGO_TARGET_DIR/release/$bin"
done
strip -o "$kit.partial/bin/gpu-tests" "$tests"

HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error "$python" worker/tests/parity/hf_goldens.py \
  "$kit.partial/goldens" > /dev/null
rm -rf "$kit"
mv "$kit.partial" "$kit"
echo "gpu-kit: $kit ($(du -sh "$kit" | cut -f1)); on the GPU host: bash bench/gpu.sh"
