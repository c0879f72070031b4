# syntax=docker/dockerfile:1
# The worker image: the `worker` binary and libtorch 2.11.0 (from PyPI's torch wheel, as
# scripts/setup-libtorch.sh lays it out) on Debian slim. CUDA by default — the NVIDIA driver
# comes from the node (NVIDIA container toolkit / GPU operator); VARIANT=cpu for CPU nodes.
# Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t REGISTRY/ferrotune/worker:0.1.0 .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg VARIANT=cpu -t .../worker:0.1.0-cpu .
# or, with the binary and libtorch already on the host (what CI does):
#   make build-cuda && docker build -f deploy/docker/worker.Dockerfile --target prebuilt -t ... .
#   make build && docker build -f deploy/docker/worker.Dockerfile --target prebuilt \
#     --build-arg LIBTORCH_DIR=third_party/libtorch --build-arg BIN_DIR=target/release -t ... .
# Both end in the same runtime stage (`runtime-base` + libtorch + the binary).
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm

FROM ${DEBIAN_IMAGE} AS runtime-base
# The binary's own rpath names the build host's libtorch; this finds it wherever the image
# keeps it.
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["worker"]
CMD ["--help"]

FROM runtime-base AS prebuilt
ARG LIBTORCH_DIR=third_party/libtorch-cuda
ARG BIN_DIR=target/cuda/release
COPY ${LIBTORCH_DIR}/lib /opt/libtorch/lib
COPY ${BIN_DIR}/worker /usr/local/bin/worker

FROM ${RUST_IMAGE} AS builder
ARG VARIANT=cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN case "$VARIANT" in \
      cuda) bash scripts/setup-libtorch.sh --cuda && dir=third_party/libtorch-cuda ;; \
      cpu) bash scripts/setup-libtorch.sh && dir=third_party/libtorch ;; \
      *) echo "VARIANT must be cuda or cpu, not '$VARIANT'" >&2; exit 2 ;; \
    esac \
 && LIBTORCH=/src/$dir cargo build --release --locked -p ferrotune-worker \
 && mkdir -p /out && cp -r "$dir/lib" /out/libtorch-lib && cp target/release/worker /out/worker

# The default target.
FROM runtime-base AS runtime
COPY --from=builder /out/libtorch-lib /opt/libtorch/lib
COPY --from=builder /out/worker /usr/local/bin/worker
