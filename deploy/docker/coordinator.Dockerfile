# syntax=docker/dockerfile:1
# The coordinator image: the `coordinator` binary (no libtorch, no accelerator) on Debian slim,
# with the tiny example (model + data) under /opt/ferrotune/examples for the cpu overlay.
# Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t REGISTRY/ferrotune/coordinator:0.1.0 .
# or, with the binary already built on the host (`make build`; what CI does):
#   docker build -f deploy/docker/coordinator.Dockerfile --target prebuilt -t ... .
# Both end in the same runtime stage (`runtime-base` + the binary).
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm

FROM ${DEBIAN_IMAGE} AS runtime-base
COPY examples/tiny/base /opt/ferrotune/examples/tiny/base
COPY examples/tiny/data /opt/ferrotune/examples/tiny/data
COPY examples/tiny/cluster.yaml /opt/ferrotune/examples/tiny/cluster.yaml
# The pods' identity (deploy/kubernetes sets the same with fsGroup): never root.
USER 10001:10001
ENTRYPOINT ["coordinator"]
CMD ["--help"]

# Binaries built on the host (glibc of Debian 12 or older).
FROM runtime-base AS prebuilt
ARG BIN_DIR=target/release
COPY ${BIN_DIR}/coordinator /usr/local/bin/coordinator

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferrotune-coordinator \
 && install -D target/release/coordinator /out/coordinator

# The default target.
FROM runtime-base AS runtime
COPY --from=builder /out/coordinator /usr/local/bin/coordinator
