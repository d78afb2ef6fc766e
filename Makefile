# Developer entry points. Run them inside the project's virtualenv (`source .venv/bin/activate`
# or yours), after `pip install -e '.[test]'` once; see CONTRIBUTING.md.
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

sources = python tests benches examples

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

.PHONY: build-dev
build-dev: ## Rebuild the native module (python/fastserve/_core.abi3.so) in place, in the active virtualenv
	@# maturin develop needs an active virtualenv ($VIRTUAL_ENV); --skip-install keeps the editable
	@# install that `pip install -e` made and only replaces the extension module next to the sources.
	@test -n "$${VIRTUAL_ENV:-}" || { echo "activate the virtualenv first (maturin develop builds into it)"; exit 1; }
	maturin develop --release --skip-install

.PHONY: fmt
fmt: ## Format Python (ruff) and Rust (rustfmt), and apply ruff's safe fixes
	ruff format $(sources)
	ruff check --fix $(sources)
	cargo fmt --all

.PHONY: lint
lint: lint-python lint-rust ## Every static check (lint-python, then lint-rust); fails on the first that fails

.PHONY: lint-python
lint-python: ## ruff, mypy (settings in pyproject.toml), and stubtest of _core.pyi against the built module
	ruff check $(sources)
	ruff format --check $(sources)
	mypy
	@# stubtest imports fastserve._core: after changing rust/fastserve-py, `make build-dev` first.
	python -m mypy.stubtest fastserve._core

.PHONY: lint-rust
lint-rust: ## rustfmt and clippy, warnings denied
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: test
test: ## The whole suite, as in the README: Rust unit tests (and the otel feature), then pytest
	cargo test
	cargo test -p fastserve-core --features otel otel
	python -m pytest

.PHONY: bench
bench: ## The benchmark harness (a few minutes; `python benches/run.py --quick` for a smoke run)
	python benches/run.py
