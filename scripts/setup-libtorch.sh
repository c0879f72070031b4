#!/usr/bin/env bash
# Fetch libtorch 2.11.0 out of the PyPI `torch` wheel.
#
# No libtorch download site is reachable from our machines, but PyPI is, and the torch wheel holds
# libtorch whole. The default is a lean CPU build (~500 MB) in third_party/libtorch; --cuda keeps
# every library of the wheel and pulls the NVIDIA runtime wheels it links against, NCCL included
# (several GB), into third_party/libtorch-cuda, so a CUDA build never replaces the CPU one.
# Idempotent: a finished install is detected by its stamp file and left alone.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME_VERSION=13.0.96
CUPTI_VERSION=13.0.85
root=$(cd "$(dirname "$0")/.." && pwd)
variant=cpu
for arg in "$@"; do
  case "$arg" in
    --cuda) variant=cuda ;;
    -h|--help) echo "usage: $0 [--cuda]"; exit 0 ;;
    *) echo "setup-libtorch: unknown argument '$arg' (expected --cuda or nothing)" >&2; exit 2 ;;
  esac
done
if [ "$variant" = cpu ]; then
  dest="$root/third_party/libtorch"
else
  dest="$root/third_party/libtorch-cuda"
fi
wheels="$root/third_party/wheels-$variant"

stamp="$dest/.ferrotune-$variant-$TORCH_VERSION"
if [ -f "$stamp" ]; then
  exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "setup-libtorch: python3 is needed to fetch wheels from PyPI" >&2; exit 1; }

# pip does not widen platform tags by itself when --platform is given, so name the range.
platforms=()
for n in 35 34 31 28 27 25 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
pip_download() {
  "$python" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp \
    "${platforms[@]}" -d "$wheels" "$@"
}

mkdir -p "$wheels"
echo "setup-libtorch: fetching torch==$TORCH_VERSION ($variant) wheels from PyPI into $wheels"
if [ "$variant" = cpu ]; then
  pip_download --no-deps "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION" \
    "nvidia-cuda-cupti==$CUPTI_VERSION"
else
  # The wheel's own Linux requirements name the NVIDIA libraries libtorch_cuda links against;
  # the Python-only ones (triton, cuda-bindings) are left out.
  pip_download --no-deps "torch==$TORCH_VERSION"
  mapfile -t nvidia < <("$python" "$root/scripts/extract_libtorch.py" --requirements \
    --wheels "$wheels")
  if ! pip_download "${nvidia[@]}"; then
    # A registry may lack the exact NCCL build the wheel pins (ours did: 2.28.9); NCCL keeps its
    # ABI within major version 2 (libnccl.so.2), so the newest 2.x serves.
    echo "setup-libtorch: the pinned NCCL is not available; taking the newest NCCL 2.x" >&2
    nvidia=("${nvidia[@]/#nvidia-nccl-cu13==*/nvidia-nccl-cu13<3}")
    pip_download "${nvidia[@]}"
  fi
fi

tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
"$python" "$root/scripts/extract_libtorch.py" --variant "$variant" --wheels "$wheels" --dest "$tmp" \
  --torch-version "$TORCH_VERSION"
rm -rf "$dest"
mv "$tmp" "$dest"
touch "$stamp"
# The wheels are only an intermediate: keep the disk for the build.
rm -rf "$wheels"
echo "setup-libtorch: libtorch $TORCH_VERSION ($variant) ready in $dest ($(du -sh "$dest" | cut -f1))"
