#!/usr/bin/env bash
# Fetch libtorch 2.11.0 out of the PyPI `torch` wheel into third_party/libtorch.
#
# No libtorch download site is reachable from our machines, but PyPI is, and the torch wheel holds
# libtorch whole. The default is a lean CPU build (~500 MB); --cuda keeps every library of the wheel
# and pulls the NVIDIA runtime wheels it links against (several GB), for GPU hosts.
# Idempotent: a finished install is detected by its stamp file and left alone.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME_VERSION=13.0.96
CUPTI_VERSION=13.0.85
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/third_party/libtorch"
wheels="$root/third_party/wheels"
variant=cpu
for arg in "$@"; do
  case "$arg" in
    --cuda) variant=cuda ;;
    -h|--help) echo "usage: $0 [--cuda]"; exit 0 ;;
    *) echo "setup-libtorch: unknown argument '$arg' (expected --cuda or nothing)" >&2; exit 2 ;;
  esac
done

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
  pip_download "torch==$TORCH_VERSION"
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
