#!/usr/bin/env bash
# Builds the coordinator image and the CPU worker image from deploy/docker/ with podman,
# offline, from the binaries and libtorch already built on this host (the Dockerfiles' `prebuilt`
# target), then exports each image's root filesystem and configuration for the Kubernetes test.
# Installs Debian's podman and debootstrap when missing (needs root). The Debian base image
# comes from debootstrap (no registry is reachable here), cached as a tarball under
# target/k8s/ so it is made once per checkout.
#
#   images.sh OUT COORDINATOR_TAG WORKER_TAG
#     OUT/coordinator/rootfs, OUT/coordinator/config.json (podman image inspect), same for worker
#
# Exit 3: a prerequisite is missing and cannot be installed.
set -euo pipefail
out=${1:?usage: images.sh OUT COORDINATOR_TAG WORKER_TAG}
coordinator_tag=${2:?}
worker_tag=${3:?}
root=$(cd "$(dirname "$0")/../.." && pwd)
base_image=docker.io/library/debian:bookworm-slim

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "images: podman and debootstrap are not installed, and installing them needs root" >&2
    exit 3
  fi
  echo "images: installing Debian's podman and debootstrap" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman debootstrap >/dev/null
fi

# One build at a time on this machine (podman's storage is shared).
mkdir -p "$root/target"
exec 9>"$root/target/k8s.lock"
flock 9

cache="$root/target/k8s/debian-bookworm-minbase.tar"
if ! podman image exists "$base_image"; then
  if [ ! -s "$cache" ]; then
    echo "images: making the Debian bookworm base with debootstrap (once per checkout)" >&2
    mkdir -p "$(dirname "$cache")"
    tmp=$(mktemp -d "$root/target/k8s/debootstrap.XXXXXX")
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    debootstrap --variant=minbase bookworm "$tmp" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$tmp" -cf "$cache.partial" .
    mv "$cache.partial" "$cache"
    rm -rf "$tmp"
  fi
  podman import --quiet "$cache" "$base_image" >/dev/null
fi

build() {
  local file=$1 tag=$2
  shift 2
  echo "images: building $tag from deploy/docker/$file" >&2
  podman build --quiet --isolation chroot --pull=never --target prebuilt \
    -f "$root/deploy/docker/$file" -t "$tag" "$@" "$root" >/dev/null
}
build coordinator.Dockerfile "$coordinator_tag"
build worker.Dockerfile "$worker_tag" \
  --build-arg LIBTORCH_DIR=third_party/libtorch --build-arg BIN_DIR=target/release

export_image() {
  local tag=$1 dir=$2
  rm -rf "$dir"
  mkdir -p "$dir/rootfs"
  podman image inspect "$tag" > "$dir/config.json"
  local id
  id=$(podman create "$tag")
  podman export "$id" | tar -x -C "$dir/rootfs"
  podman rm "$id" >/dev/null
}
export_image "$coordinator_tag" "$out/coordinator"
export_image "$worker_tag" "$out/worker"
echo "images: $coordinator_tag and $worker_tag exported under $out" >&2
