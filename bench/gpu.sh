#!/usr/bin/env bash
# The GPU checks and benchmark in one command, for a host with an NVIDIA GPU and a Python whose
# PyTorch 2.11 (CUDA) carries NCCL. It runs the kit `make gpu-kit` builds on a build host
# (target/gpu-kit: stripped CUDA binaries and the Hugging Face goldens), so the GPU host needs no
# Rust toolchain and no network. Correctness first, then performance; every result is written
# into OUT as soon as it exists, so a run cut short keeps what it measured:
#   summary.txt       one line per check
#   gpu-tests.log     NCCL at world size 1, abort, CUDA vs CPU fine-tune, goldens on CUDA
#   job-cuda.log, job-cpu.log, job-cuda-zero2.log, job-cuda-bf16-zero1.log, job-compare.txt
#                     the tiny example through coordinator + worker on 1 GPU (NCCL) and on CPU,
#                     and on the GPU at ZeRO stage 2 (fp32) and stage 1 (bf16 compute)
#   results.json, results.md
#                     training-step figures against PyTorch eager (bench/gpu_bench.py)
#
# usage: bash bench/gpu.sh [OUT]      (default: $OUT, else target/gpu-results)
#        QUICK=1 bash bench/gpu.sh    (short benchmark steps)
#        ROUNDS=1 bash bench/gpu.sh   (benchmark rounds; default 2)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kit=${FERROTUNE_GPU_KIT:-$root/target/gpu-kit}
out=${1:-${OUT:-$root/target/gpu-results}}
python=${PYTHON:-python3}
mkdir -p "$out"
summary="$out/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

[ -x "$kit/bin/worker" ] || { echo "gpu.sh: no kit at $kit: run \`make gpu-kit\` on a build host" >&2; exit 2; }

# The host's PyTorch provides libtorch (CUDA) and the NVIDIA libraries the worker links against.
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') \
  || { echo "gpu.sh: $python cannot import torch" >&2; exit 2; }
nvidia_libs=$("$python" - <<'EOF'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(os.path.join(base, "nvidia", "**", "lib"), recursive=True):
        dirs.add(d)
print(":".join(sorted(dirs)))
EOF
)
# cudarc loads libnccl.so; the NCCL wheel ships only libnccl.so.2.
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
nccl=$(IFS=:; for d in $torch_lib $nvidia_libs; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -1)
[ -n "$nccl" ] && ln -sf "$nccl" "$links/libnccl.so"
export LD_LIBRARY_PATH="$links:$torch_lib:$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
note "host: $(hostname); torch lib: $torch_lib; NCCL: ${nccl:-not found}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
head -12 "$out/nvidia-smi.txt" | tee -a "$summary"

# (a) correctness: the GPU tests.
FERROTUNE_GPU_TESTS=1 FERROTUNE_GOLDENS="$kit/goldens" timeout 600 \
  "$kit/bin/gpu-tests" --test-threads=1 --nocapture > "$out/gpu-tests.log" 2>&1
note "gpu tests: exit $? ($(grep -E '^test result' "$out/gpu-tests.log" | tail -1))"

# The tiny example through coordinator and worker, 10 steps, a checkpoint at step 5: on the GPU
# (device auto resolves to cuda, collective to NCCL) and on the CPU, same worker binary; then on
# the GPU at zero_stage 2 (NCCL reduce-scatter, in-place all-gather, the moments broadcast to
# rank 0 at each checkpoint) and at zero_stage 1 under bf16 (sharded fp32 masters, the bf16
# weights all-gathered as f32 words).
tiny_job() {  # name device zero_stage precision
  local job
  job=$(mktemp -d)
  cp -r "$root/examples/tiny/." "$job/"
  rm -rf "$job/runs"
  sed -i -e "s/^  world_size: 2/  world_size: 1\n  device: $2\n  worker_binary: ${kit//\//\\/}\/bin\/worker/" \
    -e 's/^  steps: 60/  steps: 10/' -e 's/^  log_every_steps: 5/  log_every_steps: 1/' \
    -e 's/^  every_steps: 30/  every_steps: 5/' -e "s/^training:/training:\n  zero_stage: $3/" \
    -e "s/^model:/model:\n  precision: $4/" "$job/cluster.yaml"
  timeout 300 "$kit/bin/coordinator" launch "$job/cluster.yaml" > "$out/job-$1.log" 2>&1
  note "tiny job $1: exit $? ($(grep -c 'committed' "$out/job-$1.log") checkpoints committed; $(grep -o 'training starts.*' "$out/job-$1.log" | head -1))"
  rm -rf "$job"
}
tiny_job cuda cuda 0 fp32
tiny_job cpu cpu 0 fp32
tiny_job cuda-zero2 cuda 2 fp32
tiny_job cuda-bf16-zero1 cuda 1 bf16
"$python" - "$out" <<'EOF' | tee "$out/job-compare.txt" | tee -a "$summary"
import re, sys
def losses(path):
    return [float(m.group(1)) for m in re.finditer(r"step\s+\d+/\d+ \| loss (\S+)", open(path).read())]
out = sys.argv[1]
def compare(what, a, b, bound):
    worst = max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=float("nan"))
    ok = len(a) == len(b) == 10 and worst <= bound
    print(f"tiny job losses {what}: {'OK' if ok else 'MISMATCH'} (worst relative difference {worst:.2e})")
    print(f"  {a}\n  {b}")
cuda, cpu = losses(f"{out}/job-cuda.log"), losses(f"{out}/job-cpu.log")
# Losses print with 4 decimals; fp32 on both devices (no TF32): within 2e-3 relative.
compare("cuda vs cpu", cuda, cpu, 2e-3)
# The same device and data: ZeRO changes only the clipping norm's summation order.
compare("cuda zero_stage 2 vs 0", losses(f"{out}/job-cuda-zero2.log"), cuda, 2e-3)
# bf16 compute against fp32: close, not equal.
compare("cuda bf16 zero_stage 1 vs fp32 stage 0", losses(f"{out}/job-cuda-bf16-zero1.log"), cuda, 5e-2)
EOF

# (b) performance, against PyTorch eager in the same run.
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
"$python" "$root/bench/gpu_bench.py" --train-step "$kit/bin/train-step" --out "$out" "${quick[@]}" \
  --rounds "${ROUNDS:-2}" \
  2>&1 | tee "$out/bench.log"
note "benchmark: exit ${PIPESTATUS[0]} (results.md)"
cat "$out/results.md" 2>/dev/null
