# The two commands: `make serve` (server on the default model) and `make test` (the test suite).
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: serve test test-fast setup setup-test bench-cpu clean

setup:
	@scripts/setup_env.sh

setup-test:
	@scripts/setup_env.sh --test

serve: setup
	$(PY) -m tokenmill.cli serve --host $(HOST) --port $(PORT) $(ARGS)

test: setup-test
	scripts/run_tests.sh $(ARGS)

test-fast: setup-test
	scripts/run_tests.sh -m "not slow" $(ARGS)

clean:
	rm -rf .venv build *.egg-info
