# Two commands on a fresh machine:
#   make demo   set up, build, fine-tune the tiny example on 2 local CPU workers
#   make test   set up, build, lint, run the whole test suite
# Every install step lives here or in scripts/; nothing is expected to be installed by hand.

CARGO   ?= cargo
PYTHON  ?= python3
VENV    := .venv
LIBTORCH_STAMP := third_party/libtorch/.ferrotune-cpu-2.11.0

.PHONY: all setup libtorch venv build demo example-instruct example-multitask test lint fmt clean bench

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

# Training-step tokens/s against PyTorch eager (same shape, batch, threads), measured in one run.
bench: build venv
	$(VENV)/bin/python bench/train_step.py

lint: libtorch
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

test: setup build lint
	FERROTUNE_PYTHON=$(CURDIR)/$(VENV)/bin/python $(CARGO) test --release --workspace

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) examples/*/runs
