# mlaserve build entry points. Everything works on a fresh machine with only this repository:
#   make build   libtorch (PyPI torch wheel) into a cached venv, then target/release/mlaserve
#   make build-cuda  target/release/mlaserve-cuda: CUDA workers, NCCL expert shards (runs on CPU too)
#   make test    everything needed, then the whole test suite
#   make run     the main job: serve the demo model on 127.0.0.1:50051 (gRPC) and :8000 (HTTP)
# Expensive things live outside the checkout, in $(CACHE): the venv is keyed on
# tests/requirements.txt, cargo's target dir is shared and incremental.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

CACHE ?= $(HOME)/.cache/mlaserve
REQ := tests/requirements.txt
VENV := $(CACHE)/venv-$(shell sha256sum $(REQ) | cut -c1-16)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BIN := target/release/mlaserve
# libtorch from the wheel; an explicit LIBTORCH makes torch-sys rebuild when the venv changes.
export LIBTORCH = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/torch
export PATH := $(VENV)/bin:$(PATH)
export MLASERVE_CACHE := $(CACHE)
export MLASERVE_BIN := $(CURDIR)/$(BIN)
export MLASERVE_CUDA_BIN := $(CURDIR)/$(BIN)-cuda

.PHONY: build build-cuda gpu-bundle test run venv check-fmt lint bench-model clean-cache

$(STAMP): $(REQ)
	@mkdir -p $(CACHE)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r $(REQ)
	@touch $@

venv: $(STAMP)

# cargo's target dir lives in the cache; ./target points at it so the binary path stays stable.
target:
	@if [ ! -e target ]; then mkdir -p $(CACHE)/target && ln -s $(CACHE)/target target; fi

build: venv target
	cargo build --release --locked -p mlaserve

# The cuda feature's binary, then the CPU one again: cargo keeps both sets of artifacts, so
# switching back only re-links nothing and restores target/release/mlaserve.
build-cuda: venv target
	cargo build --release --locked -p mlaserve --features cuda
	cp $(BIN) $(BIN)-cuda.tmp && mv $(BIN)-cuda.tmp $(BIN)-cuda
	cargo build --release --locked -p mlaserve

# What a GPU session carries (the device tool's 64 MiB limit): the stripped cuda binary, ~19 MB.
# There: python benches/gpu_check.py --bin .gpu/mlaserve-cuda
gpu-bundle: build-cuda
	@mkdir -p .gpu
	strip -o .gpu/mlaserve-cuda $(BIN)-cuda

test: build build-cuda
	cargo test --release --locked --workspace
	tools/aarch64-cross.sh test
	cargo test --release --locked -p mlaserve-model --features cuda --lib nccl::
	$(PY) -m pytest -q -p no:cacheprovider tests

# Serves the demo model (a tiny model trained on Python's documentation, shipped in the binary) on
# 127.0.0.1:50051 (gRPC) and 127.0.0.1:8000 (OpenAI HTTP); try it with
#   target/release/mlaserve chat "Hello"
run: build
	$(BIN) serve $(ARGS)

check-fmt:
	cargo fmt --all -- --check

lint: venv target
	cargo clippy --release --workspace --all-targets -- -D warnings
	cargo clippy --release --workspace --all-targets --features mlaserve/cuda -- -D warnings

# Decode throughput of `generate` next to transformers on the ~200M benchmark checkpoint.
bench-model: build
	$(PY) benches/decode_vs_transformers.py --bin $(BIN)

# mlaserve next to llama.cpp (built from the PyPI sdist llama-cpp-python, cached in $(CACHE)) on the
# same weights, this machine's CPU: every figure as a ratio, the bandwidth floor, the profile.
# The NEON kernel path, cross-built for aarch64 and checked under qemu-user (skipped, with a
# message, where tools/aarch64-cross.sh install has not been run).
.PHONY: test-aarch64
test-aarch64:
	tools/aarch64-cross.sh test

.PHONY: bench-cpu
bench-cpu: build
	$(PY) benches/vs_llamacpp.py --bin $(BIN) $(ARGS)

clean-cache:
	rm -rf $(CACHE)
