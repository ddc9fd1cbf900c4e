# Every target that needs the environment depends on `setup`, which is
# idempotent: a fresh Debian bookworm machine needs nothing else.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m dataplane.demo

# The switchover fault matrix (90 independent cells, each a real migration) runs on its own, in
# MATRIX_WORKERS parallel processes; everything else runs first, serially.
MATRIX_WORKERS ?= 3
test: setup
	$(PY) -m pytest -m "not matrix" $(PYTEST_ARGS)
	$(PY) -m pytest -m matrix -n $(MATRIX_WORKERS) $(PYTEST_ARGS)

bench: setup
	$(PY) -m benches

lint: setup
	$(PY) -m ruff check dataplane qmp_driver tests benches setup.py
	$(PY) -m mypy

clean:
	rm -rf build .pytest_cache .benchmarks dataplane/native/*.so dataplane/native/*.c ext/*.c
