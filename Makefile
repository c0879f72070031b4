# Two commands on a fresh machine:
#   make demo   set up, build, fine-tune the tiny example on 2 local CPU workers
#   make test   set up, build, lint, run the whole test suite
# Every install step lives here or in scripts/; nothing is expected to be installed by hand.

CARGO   ?= cargo
PYTHON  ?= python3
VENV    := .venv
LIBTORCH_STAMP := third_party/libtorch/.ferrotune-cpu-2.11.0

.PHONY: all setup libtorch libtorch-cuda build-cuda gpu-kit venv build demo example-instruct example-multitask test lint fmt clean bench bench-quick

all: build

setup: libtorch venv

libtorch: $(LIBTORCH_STAMP)
$(LIBTORCH_STAMP):
	bash scripts/setup-libtorch.sh

venv: $(VENV)/.installed
$(VENV)/.installed: scripts/requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -r scripts/requirements-test.txt
	touch $@

# GPU hosts: the CUDA libtorch in its own directory and the build in its own target directory,
# so a CUDA build never replaces the CPU one (README "GPU hosts").
LIBTORCH_CUDA_STAMP := third_party/libtorch-cuda/.ferrotune-cuda-2.11.0
libtorch-cuda: $(LIBTORCH_CUDA_STAMP)
$(LIBTORCH_CUDA_STAMP):
	bash scripts/setup-libtorch.sh --cuda

build-cuda: libtorch-cuda
	LIBTORCH=$(CURDIR)/third_party/libtorch-cuda CARGO_TARGET_DIR=$(CURDIR)/target/cuda \
	  $(CARGO) build --release -p ferrotune-coordinator -p ferrotune-worker

# What bench/gpu.sh runs on a GPU host that has no Rust toolchain: target/gpu-kit.
gpu-kit: libtorch-cuda venv
	bash scripts/gpu-kit.sh

# One profile (release) for the demo, the tests and clippy, so libtorch crates build once.
build: libtorch
	$(CARGO) build --release --workspace

demo: build
	./target/release/coordinator launch examples/tiny/cluster.yaml

# Instruction fine-tuning, then format compliance on the held-out questions: fine-tuned vs base.
example-instruct: build
	./target/release/coordinator launch examples/instruct/cluster.yaml
	$(PYTHON) examples/instruct/compliance.py ./target/release/worker examples/instruct/runs/checkpoints/step-00000150
	$(PYTHON) examples/instruct/compliance.py ./target/release/worker examples/tiny/base

example-multitask: build
	./target/release/coordinator launch examples/multitask/cluster.yaml

# Every figure against its reference (torch.distributed Gloo, PyTorch eager, the issue's goals),
# alternating rounds in one run: a table, target/bench/results.json and results.md.
bench: build venv
	$(VENV)/bin/python bench/run.py

# The same figures at tiny sizes, one round: checks each is produced, finite, and that every peer
# reference came from a real torch process (not the values: CI machines are noisy).
bench-quick: build venv
	$(VENV)/bin/python bench/run.py --quick --check

lint: libtorch
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

test: setup build lint bench-quick
	FERROTUNE_PYTHON=$(CURDIR)/$(VENV)/bin/python $(CARGO) test --release --workspace

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) examples/*/runs
