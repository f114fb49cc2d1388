.PHONY: up test lint bench clean

## Set everything up and run site + worker + beat (SQLite, local Redis, the local host).
up:
	@bash scripts/up.sh

## Set up and run the whole test suite (every tier; gpu only where a GPU exists).
test:
	@bash scripts/test.sh

## ruff + mypy, and shellcheck on the scripts sent to hosts.
lint:
	@bash -c 'source scripts/lib.sh && ensure_venv dev && apt_install shellcheck'
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy labsite experiments clusters
	shellcheck -S warning clusters/executors/scripts/*.sh

## Benchmarks against the real harness; writes bench-results/.
bench:
	@bash scripts/bench.sh

clean:
	rm -rf .venv .test-data test-artifacts bench-results
